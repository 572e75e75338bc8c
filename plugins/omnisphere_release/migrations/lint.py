"""Lint pending migration files with squawk (the squawk-cli package), and decide which findings stop a release.

A finding **blocks** the plan only when both hold:
- its rule is one of the service's blocking rules (catalog ``migrations.blocking_rules``; by default
  :data:`DEFAULT_BLOCKING_RULES`: the rules of statements that lock or rewrite a table, and the rules of files that
  cannot run correctly inside the engine's transaction);
- for a rule about a table (:data:`TABLE_RULES`), that table exists and holds rows before the plan runs. A lock on a
  table that an earlier statement of the same plan creates, or on an empty table, blocks nobody: it is advice.
  When the table cannot be told (no database to ask, a statement the lint cannot read), the finding blocks.

Every other finding is **advice**, logged and shown in the plan: style rules (``timestamp`` without time zone,
``varchar``, ``int`` rather than ``bigint``), drops, renames. A file may accept a finding with
``-- omni:lint-ignore <rule> <reason>`` (**ignored**, logged with its reason). Rules the engine makes moot (it sets
``lock_timeout`` and ``statement_timeout`` and runs each migration in its own transaction) are not asked for at all.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from omnisphere_release.migrations.errors import InvalidMigrationInput
from omnisphere_release.migrations.files import Migration, strip_comments

# The engine sets both timeouts on every migration and runs each in its own transaction.
MOOT_RULES = ("require-lock-timeout", "require-statement-timeout", "require-timeout-settings", "prefer-robust-stmts")

# A statement these rules flag takes a long lock on the table it names, or rewrites or scans it under one, or
# (adding-required-field) fails on a table with rows. On a new or empty table that costs nothing.
TABLE_RULES = frozenset({
    "adding-field-with-default", "adding-foreign-key-constraint", "adding-not-nullable-field", "adding-required-field",
    "adding-serial-primary-key-field", "changing-column-type", "constraint-missing-not-valid",
    "disallowed-unique-constraint", "require-concurrent-index-creation", "require-concurrent-index-deletion",
    "require-concurrent-reindex", "require-concurrent-partition-detach",
})
# A file these rules flag does not do what it says inside the engine's transaction (a COMMIT in it ends the
# engine's transaction early, so the file stops being all-or-nothing), whatever table it touches.
TRANSACTION_RULES = frozenset({
    "transaction-nesting", "ban-concurrent-index-creation-in-transaction", "ban-uncommitted-transaction",
})
#: The blocking rules of a service whose catalog entry sets no ``migrations.blocking_rules``.
DEFAULT_BLOCKING_RULES: frozenset[str] = TABLE_RULES | TRANSACTION_RULES

# Every rule squawk 2.70 accepts in --include (see https://squawkhq.com/docs/rules; tests/unit/test_migration_files.py
# asks the installed squawk). A catalog entry naming another one is refused, naming it: squawk itself would fail the
# lint of every plan, and HEAD's misspelt 'prefer-timestamptz' silently made a style rule block.
KNOWN_RULES = frozenset({
    *TABLE_RULES, *TRANSACTION_RULES, *MOOT_RULES,
    "renaming-column", "renaming-table", "renaming-object", "ban-drop-database", "ban-drop-column", "ban-drop-table",
    "ban-drop-not-null", "ban-drop-constraint", "ban-drop-index", "ban-drop-view", "ban-drop-function",
    "ban-drop-type", "ban-drop-schema", "ban-drop-sequence", "ban-drop-domain", "ban-drop-extension",
    "ban-drop-policy", "ban-drop-trigger", "ban-drop-generated-expression", "ban-truncate-cascade",
    "ban-create-domain-with-constraint", "ban-alter-domain-with-add-constraint", "ban-char-field",
    "prefer-bigint-over-int", "prefer-bigint-over-smallint", "prefer-identity", "prefer-text-field",
    "prefer-timestamp-tz", "prefer-repack", "require-table-schema", "require-enum-value-ordering",
    "identifier-too-long", "ban-set-schema", "ban-alter-identity", "ban-alter-generated-expression",
    "ban-set-default", "ban-disable-trigger", "ban-replica-identity", "ban-revoke", "ban-replace-view-function",
    "ban-alter-policy-condition", "ban-alter-policy-roles", "ban-create-policy", "ban-alter-function-options",
    "ban-alter-view-options", "ban-alter-role-options", "ban-alter-database-options", "ban-alter-row-level-security",
    "ban-new-write-restriction", "ban-add-enum-value", "ban-add-composite-attribute", "ban-add-column",
    "ban-detach-inheritance", "ban-alter-sequence-values", "ban-alter-system-options", "ban-alter-extension",
})

_NAME = r'(?:"[^"]+"|[A-Za-z_][\w$]*)(?:\s*\.\s*(?:"[^"]+"|[A-Za-z_][\w$]*))?'
# The relation a statement locks: the table of ALTER TABLE / CREATE INDEX ... ON / REINDEX TABLE, the index of
# DROP INDEX / REINDEX INDEX (the database lookup turns an index into its table).
_TARGETS = [re.compile(p, re.IGNORECASE | re.DOTALL) for p in (
    rf"^\s*ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?(?P<name>{_NAME})",
    rf"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:(?:IF\s+NOT\s+EXISTS\s+)?{_NAME}\s+)?"
    rf"ON\s+(?:ONLY\s+)?(?P<name>{_NAME})",
    rf"^\s*DROP\s+INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+EXISTS\s+)?(?P<name>{_NAME})",
    rf"^\s*REINDEX\s+(?:\([^)]*\)\s*)?(?:TABLE|INDEX)\s+(?:CONCURRENTLY\s+)?(?P<name>{_NAME})",
)]
_CREATE_TABLE = re.compile(
    rf"^\s*CREATE\s+(?:(?:GLOBAL\s+|LOCAL\s+)?(?:TEMP|TEMPORARY)\s+|UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    rf"(?P<name>{_NAME})", re.IGNORECASE | re.DOTALL)
_TARGETS.append(_CREATE_TABLE)  # a finding inside CREATE TABLE (an inline REFERENCES) is about the new table

#: ``relation_rows(name)``: None when no such relation exists, else whether its table holds rows.
RelationRows = Callable[[str], "bool | None"]


class LintUnavailable(RuntimeError):
    """squawk is not installed where the engine runs."""


@dataclass(frozen=True)
class Finding:
    file: Path
    version: int
    rule: str
    line: int
    message: str
    severity: str  # "blocking", "advice" or "ignored"
    ignore_reason: str | None = None
    table: str | None = None
    why: str = ""  # why this severity, when it is not the rule alone (the table is new, empty, or holds rows)

    def describe(self) -> str:
        text = f"{self.file.name}:{self.line + 1}: {self.rule}: {self.message}"
        if self.why:
            text += f" [{self.why}]"
        if self.ignore_reason:
            text += f" (ignored: {self.ignore_reason})"
        return text


def blocking_rules_problem(rules: Iterable[str] | None) -> str | None:
    """Say what is wrong with a service's ``migrations.blocking_rules``, or None when nothing is."""
    if rules is None:
        return None
    unknown = sorted(set(rules) - KNOWN_RULES)
    if unknown:
        return (f"unknown squawk rule(s) {', '.join(unknown)}; known rules: {', '.join(sorted(KNOWN_RULES))} "
                f"(a rule of a newer squawk must be added to KNOWN_RULES in migrations/lint.py)")
    moot = sorted(set(rules) & set(MOOT_RULES))
    if moot:
        return f"{', '.join(moot)} cannot block: the engine sets lock and statement timeouts itself; remove them"
    return None


def squawk_executable() -> str:
    # Prefer the one installed beside this Python (the project's venv), then PATH.
    candidate = Path(sys.executable).with_name("squawk")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("squawk")
    if not found:
        raise LintUnavailable("squawk is not installed; install squawk-cli (it is in requirements.txt)")
    return found


def lint(migrations: list[Migration], pg_version: str = "16", blocking_rules: Iterable[str] | None = None,
         relation_rows: RelationRows | None = None) -> list[Finding]:
    """Lint the up files of ``migrations`` (the steps of one plan, in order); return every finding with its severity.

    ``blocking_rules``: the service's (None: :data:`DEFAULT_BLOCKING_RULES`). ``relation_rows``: asks the database
    about a table that exists before the plan; without it every such table is taken to hold rows.
    """
    problem = blocking_rules_problem(blocking_rules)
    if problem:
        raise InvalidMigrationInput(f"migrations.blocking_rules in the catalog: {problem}")
    blocking = frozenset(DEFAULT_BLOCKING_RULES if blocking_rules is None else blocking_rules)
    by_path = {m.up.path.resolve(): m for m in migrations}
    statements = {m.version: _statements(m.up.sql) for m in migrations}
    created = _tables_created(migrations, statements)
    findings: list[Finding] = []
    in_transaction = [m.up.path for m in migrations if not m.up.no_transaction]
    outside = [m.up.path for m in migrations if m.up.no_transaction]
    for paths, assume_transaction in ((in_transaction, True), (outside, False)):
        if not paths:
            continue
        for raw in _run_squawk(paths, assume_transaction, pg_version, blocking):
            migration = by_path[Path(raw["file"]).resolve()]
            rule = raw["rule_name"]
            line = int(raw.get("line") or 0)
            table = _target(migration.up.sql, statements[migration.version], line, int(raw.get("column") or 0))
            reason = migration.up.lint_ignores.get(rule)
            if reason:
                severity, why = "ignored", ""
            elif rule not in blocking:
                severity, why = "advice", ""
            elif rule not in TABLE_RULES:
                severity, why = "blocking", ""
            else:
                severity, why = _table_severity(table, migration, line, created, relation_rows)
            findings.append(Finding(file=migration.up.path, version=migration.version, rule=rule, line=line,
                                    message=raw.get("message", ""), severity=severity, ignore_reason=reason,
                                    table=table, why=why))
    return sorted(findings, key=lambda f: (f.version, f.line, f.rule))


def _table_severity(table: str | None, migration: Migration, line: int, created: dict[str, tuple[int, int]],
                    relation_rows: RelationRows | None) -> tuple[str, str]:
    if table is None:
        return "blocking", "cannot tell which table this statement locks"
    origin = created.get(_key(table))
    if origin is not None and origin <= (migration.version, line):
        return "advice", f"{table} is created earlier in this plan: it holds no rows yet"
    if relation_rows is None:
        return "blocking", f"{table} is taken to hold rows (no database to ask)"
    rows = relation_rows(table)
    if rows is None:
        return "advice", f"{table} does not exist before this plan"
    if not rows:
        return "advice", f"{table} is empty"
    return "blocking", f"{table} holds rows"


@dataclass(frozen=True)
class _Statement:
    start: int  # character offsets of the statement in its file
    end: int
    text: str  # without comments


def _statements(sql: str) -> list[_Statement]:
    import sqlparse

    found, offset = [], 0
    for statement in sqlparse.parse(sql):
        text = str(statement)
        found.append(_Statement(offset, offset + len(text), strip_comments(text).strip()))
        offset += len(text)
    return found


def _target(sql: str, statements: list[_Statement], line: int, column: int) -> str | None:
    """Return the relation named by the statement at squawk's 0-based ``line``:``column``, if it can be read."""
    line_starts = [0] + [i + 1 for i, char in enumerate(sql) if char == "\n"]
    offset = line_starts[min(line, len(line_starts) - 1)] + column
    statement = next((s for s in statements if s.start <= offset < s.end), None)
    return _target_of(statement)


def _target_of(statement: _Statement | None) -> str | None:
    if statement is None:
        return None
    for pattern in _TARGETS:
        match = pattern.match(statement.text)
        if match:
            return _normal(match.group("name"))
    return None


def _tables_created(migrations: list[Migration], statements: dict[int, list[_Statement]]) -> dict[str, tuple[int, int]]:
    """Return each table the plan creates, keyed by name, with where it is created: (version, line)."""
    created: dict[str, tuple[int, int]] = {}
    for migration in migrations:
        for statement in statements[migration.version]:
            match = _CREATE_TABLE.match(statement.text)
            if match:
                line = migration.up.sql.count("\n", 0, statement.start)
                created.setdefault(_key(_normal(match.group("name"))), (migration.version, line))
    return created


def _normal(name: str) -> str:
    """Write a relation name as PostgreSQL reads it: unquoted parts in lower case, quoted parts as they are."""
    parts = re.findall(r'"[^"]+"|[^.\s]+', name)
    return ".".join(p if p.startswith('"') else p.lower() for p in parts)


def _key(name: str) -> str:
    # The plan's own tables are compared by their last part: "public.users" and "users" are one table here.
    return name.rsplit(".", 1)[-1].strip('"')


def _run_squawk(paths: list[Path], assume_transaction: bool, pg_version: str, blocking: frozenset[str]) -> list[dict]:
    command = [squawk_executable(), "--reporter", "json", f"--pg-version={pg_version}",
               f"--exclude={','.join(MOOT_RULES)}"]
    if blocking:  # some blocking rules are opt-in in squawk: ask for them
        command.append(f"--include={','.join(sorted(blocking))}")
    if assume_transaction:
        command.append("--assume-in-transaction")
    command += [str(p) for p in paths]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    try:
        return json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        raise RuntimeError(f"squawk failed (exit {result.returncode}): {result.stderr.strip()[:2000]}") from None
