"""Discover and validate a service's migration files, before anything touches the database.

A migration is a pair ``NNN_name.up.sql`` / ``NNN_name.down.sql``, named as golang-migrate names them: the number is
the version (``0_initial`` is version 0; ``7_x`` and ``007_x`` are both version 7, so padded and unpadded names sort
together; a gap in the numbers is allowed). Directives are SQL comments on lines of their own:

``-- omni:no-transaction``
    run outside a transaction (``CREATE INDEX CONCURRENTLY``); the engine marks the version dirty before and clean after.
``-- omni:irreversible <reason>``
    (up file) no down file; rolling back a release that applied it restores the backup instead.
``-- omni:lint-ignore <rule> <reason>``
    accept one squawk finding in this file; the reason is logged.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from omnisphere_release.migrations.errors import InvalidMigrationInput

FILE_NAME = re.compile(r"^(?P<version>\d+)_(?P<name>[a-z0-9][a-z0-9_]*)\.(?P<direction>up|down)\.sql$")
DIRECTIVE = re.compile(r"^\s*--\s*omni:(?P<name>[a-z-]+)\b(?P<args>.*)$", re.MULTILINE)
KNOWN_DIRECTIVES = {"no-transaction", "irreversible", "lint-ignore"}


class MigrationFileError(InvalidMigrationInput):
    """A migration file is unusable; the message names the file and says how to fix it."""


@dataclass(frozen=True)
class SqlFile:
    path: Path
    sql: str
    checksum: str
    no_transaction: bool
    lint_ignores: dict[str, str] = field(default_factory=dict)  # rule -> reason


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: SqlFile
    down: SqlFile | None
    irreversible_reason: str | None = None

    @property
    def label(self) -> str:
        """The file name without ``.up.sql``, as written: ``0_initial``, ``004_users_last_login``."""
        return self.up.path.name.removesuffix(".up.sql")

    @property
    def reversible(self) -> bool:
        return self.down is not None


def _read(path: Path) -> SqlFile:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MigrationFileError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MigrationFileError(
            f"{path}: not UTF-8 (invalid byte at offset {exc.start}); save the file as UTF-8") from None
    if not strip_comments(text).strip():
        raise MigrationFileError(f"{path}: contains no SQL statement; write the migration or delete the file")
    directives = _directives(path, text)
    ignores: dict[str, str] = {}
    for args in directives.get("lint-ignore", []):
        rule, _, reason = args.partition(" ")
        if not rule or not reason.strip():
            raise MigrationFileError(
                f"{path}: '-- omni:lint-ignore' needs a rule and a reason, e.g. "
                f"'-- omni:lint-ignore require-concurrent-index-creation table is empty'")
        ignores[rule] = reason.strip()
    return SqlFile(
        path=path,
        sql=text,
        checksum=hashlib.sha256(raw).hexdigest(),
        no_transaction="no-transaction" in directives,
        lint_ignores=ignores,
    )


def _directives(path: Path, text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for match in DIRECTIVE.finditer(text):
        name = match.group("name")
        if name not in KNOWN_DIRECTIVES:
            raise MigrationFileError(
                f"{path}: unknown directive 'omni:{name}'; known directives: {', '.join(sorted(KNOWN_DIRECTIVES))}")
        found.setdefault(name, []).append(match.group("args").strip())
    return found


def strip_comments(text: str) -> str:
    """Return ``text`` without its SQL comments (``--`` to the end of a line, ``/* ... */``)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


def discover(folder: Path) -> list[Migration]:
    """Return the migrations in ``folder`` sorted by version; raise MigrationFileError on any inconsistency."""
    if not folder.is_dir():
        raise MigrationFileError(f"{folder}: migrations folder not found; create it or check OMNISPHERE_SQL_DIR")
    ups: dict[int, tuple[str, Path]] = {}
    downs: dict[int, tuple[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir() or path.name.startswith("."):
            continue
        match = FILE_NAME.match(path.name)
        if not match:
            raise MigrationFileError(
                f"{path}: not a migration file name; expected NNN_name.up.sql or NNN_name.down.sql "
                f"(digits, underscore, lower-case name)")
        version = int(match.group("version"))
        table = ups if match.group("direction") == "up" else downs
        if version in table:
            raise MigrationFileError(
                f"{path}: duplicate version {version} (also {table[version][1].name}); give each migration its own number")
        table[version] = (match.group("name"), path)

    for version, (name, path) in downs.items():
        if version not in ups:
            raise MigrationFileError(f"{path}: down file without an up file {path.name.replace('.down.sql', '.up.sql')}; "
                                     f"add it or delete this file")
        if ups[version][0] != name:
            raise MigrationFileError(
                f"{path}: name does not match its up file {ups[version][1].name}; rename one so both say the same")

    migrations = []
    for version in sorted(ups):
        name, up_path = ups[version]
        up = _read(up_path)
        irreversible = _directives(up_path, up.sql).get("irreversible")
        down = _read(downs[version][1]) if version in downs else None
        reason = irreversible[0] if irreversible else None
        if irreversible is not None and not reason:
            raise MigrationFileError(f"{up_path}: '-- omni:irreversible' needs a reason, e.g. '-- omni:irreversible drops column data'")
        if down is None and irreversible is None:
            raise MigrationFileError(
                f"{up_path}: no down file {up_path.name.replace('.up.sql', '.down.sql')}; write it, or declare the "
                f"migration '-- omni:irreversible <reason>' (a rollback then restores the backup)")
        if down is not None and irreversible is not None:
            raise MigrationFileError(f"{up_path}: declared irreversible but has a down file; remove one of the two")
        migrations.append(Migration(version=version, name=name, up=up, down=down, irreversible_reason=reason))
    return migrations


def split_statements(sql: str) -> list[str]:
    """Split a no-transaction file into statements: each must run on its own (PostgreSQL wraps a multi-statement
    query string in an implicit transaction, which CREATE INDEX CONCURRENTLY refuses)."""
    import sqlparse

    statements = []
    for statement in sqlparse.split(sql):
        if strip_comments(statement).strip().rstrip(";").strip():
            statements.append(statement)
    return statements


UP_TEMPLATE = """-- {label}: say what this migration changes and why; the plan and the release log show this file.
-- It runs in one transaction, with lock_timeout and statement_timeout set by the engine. The lint blocks a
-- statement that locks or rewrites a table holding rows (CREATE INDEX without CONCURRENTLY, ADD CONSTRAINT without
-- NOT VALID, ALTER COLUMN TYPE, ...): write the safe form, or accept the finding with a directive.
-- Directives, each on a line of its own that starts with "-- omni:" (copy the one you need):
--   no-transaction                run outside a transaction, one statement at a time (CREATE INDEX CONCURRENTLY)
--   irreversible <reason>         no down file (delete {down}): rolling back restores the backup
--   lint-ignore <rule> <reason>   accept one squawk finding in this file; the reason is logged

"""
DOWN_TEMPLATE = """-- {label}: undo exactly what {up} does, in reverse order, so that up then down leaves the schema as it was.
-- A rollback runs it after the application was rolled back. "-- omni:no-transaction" works here too.

"""
_NEW_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def next_file_version(folder: Path) -> str:
    """Return the number of the next migration in ``folder`` as its file name spells it, following the padding of the
    newest file (``004`` -> ``005``, ``16`` -> ``17``, ``0`` -> ``1``; a folder without migrations starts at ``001``)."""
    spelled = [match.group("version") for path in folder.iterdir() if (match := FILE_NAME.match(path.name))]
    if not spelled:
        return "001"
    newest = max(spelled, key=lambda digits: (int(digits), len(digits)))
    padded = len(newest) > 1 and newest.startswith("0")
    following = int(newest) + 1
    return f"{following:0{len(newest)}d}" if padded else str(following)


def new_migration(folder: Path, name: str) -> tuple[Path, Path]:
    """Create the next ``NNN_name.up.sql`` and ``NNN_name.down.sql`` in ``folder`` from the templates; return both.

    The files hold only comments: until someone writes their SQL, discover() refuses them, so an unfinished
    migration cannot be released by accident.
    """
    if not _NEW_NAME.match(name):
        suggestion = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "describe_the_change"
        raise MigrationFileError(f"migration name {name!r}: use lower-case letters, digits and underscores, "
                                 f"e.g. {suggestion!r}")
    if not folder.is_dir():
        raise MigrationFileError(f"{folder}: migrations folder not found; create it or check OMNISPHERE_SQL_DIR")
    discover(folder)  # a folder that is already broken is fixed first: the new number must be the right one
    label = f"{next_file_version(folder)}_{name}"
    up, down = folder / f"{label}.up.sql", folder / f"{label}.down.sql"
    up.write_text(UP_TEMPLATE.format(label=label, down=down.name), encoding="utf-8")
    down.write_text(DOWN_TEMPLATE.format(label=label, up=up.name), encoding="utf-8")
    return up, down
