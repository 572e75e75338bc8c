"""Data migration specs: include/sql/<service>/data/<name>.yaml, validated before anything runs.

```yaml
description: Copy events into the partitioned events_v2 table
table: events            # the table walked in key order
key: id                  # an indexed integer column, unique (the primary key is ideal)
batch_size: 5000         # the first batch's size, in keys of the table
batch_seconds: 0.5       # optional; later batches are sized to take about this long (0 = every batch batch_size)
min_batch_size: 500      # optional bounds of that sizing (default: batch_size / 10 and batch_size * 10)
max_batch_size: 50000
throttle: {rows_per_second: 0, pause_ms: 0}   # optional; 0 = as fast as the database allows
statement: |             # one batch: the rows with :last_key < key <= :upper_key
  INSERT INTO events_v2 (id, account, kind, at)
  SELECT id, account, kind, at FROM events WHERE id > :last_key AND id <= :upper_key
verify: |                # must return one row whose first column is true
  SELECT (SELECT count(*) FROM events) = (SELECT count(*) FROM events_v2)
reversible: true
revert: |                # optional; batched the same way, walking the same key range
  DELETE FROM events_v2 WHERE id > :last_key AND id <= :upper_key
```

Why a key *range* rather than ``LIMIT :n``: the engine finds each batch's upper key with an index-only scan, so the
statement is idempotent for its range, the checkpoint is exactly that upper key, and a statement needs no RETURNING.
Placeholders are ``:last_key`` and ``:upper_key`` (``:batch_size`` is also available); they are bound as parameters,
never pasted into the SQL.

Why sizes adapt (as pt-online-schema-change's ``--chunk-time``): the right batch size depends on the row width, the
indexes and the load of the day, which the spec's author cannot know. A batch that takes about ``batch_seconds`` holds
its locks that long at most, and a batch commit every half second costs little next to the batch itself. The maximum
bounds what one transaction may touch (locks, WAL, replica lag); the minimum keeps a slow patch from crawling.

A batch may be Python instead of SQL, for work SQL says badly (parsing, calling a library): ``python:
datamigrations.users:copy_users`` in place of ``statement`` (and ``revert_python`` in place of ``revert``) names a
function ``copy_users(conn, last_key, upper_key) -> int`` that does the rows ``last_key < key <= upper_key`` on
``conn`` inside the batch's transaction (it must not commit) and returns how many rows it changed. Modules are looked
up in the include folder that holds the SQL tree (see :mod:`omnisphere_release.datamigrate.code`), then on sys.path.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from omnisphere_release.migrations.errors import InvalidMigrationInput

PLACEHOLDER = re.compile(r"(?<!:):(last_key|upper_key|batch_size)\b")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
# module.path:function, e.g. datamigrations.users:copy_users
PYTHON_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
KNOWN_KEYS = {"description", "table", "key", "batch_size", "batch_seconds", "min_batch_size", "max_batch_size",
              "throttle", "statement", "python", "verify", "reversible", "revert", "revert_python", "lock_timeout_ms",
              "statement_timeout_ms"}
MAX_BATCH_SIZE = 1_000_000


class DataSpecError(InvalidMigrationInput):
    """A data migration spec is unusable; the message names the file and the field."""


@dataclass(frozen=True)
class DataMigrationSpec:
    name: str
    path: Path
    description: str
    table: str
    key: str
    batch_size: int
    rows_per_second: float
    pause_ms: int
    statement: str | None  # SQL of one batch, or None when ``python`` names a function instead
    verify: str
    reversible: bool
    revert: str | None
    lock_timeout_ms: int
    statement_timeout_ms: int
    checksum: str
    python: str | None = None  # module:function of one batch
    revert_python: str | None = None
    batch_seconds: float = 0.0  # target duration of one batch; 0 = every batch is batch_size
    min_batch_size: int = 0  # bounds of the adaptive size (both batch_size when batch_seconds is 0)
    max_batch_size: int = 0

    def batch_work(self, direction: str) -> tuple[str, str]:
        """Return ("sql", statement) or ("python", module:function) for one batch of ``direction``."""
        if direction == "forward":
            return ("python", self.python) if self.python else ("sql", self.statement or "")
        return ("python", self.revert_python) if self.revert_python else ("sql", self.revert or "")

    def bind(self, sql_text: str) -> str:
        """Turn :placeholders into psycopg2 named parameters (and protect any literal %)."""
        return PLACEHOLDER.sub(lambda m: f"%({m.group(1)})s", sql_text.replace("%", "%%"))


def load_spec(path: Path) -> DataMigrationSpec:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataSpecError(f"{path}: cannot be read as UTF-8 YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise DataSpecError(f"{path}: must be a mapping of fields (description, table, key, statement, verify...)")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise DataSpecError(f"{path}: field {unknown[0]}: unknown key; known keys: {', '.join(sorted(KNOWN_KEYS))}")

    def need(field: str) -> str:
        value = raw.get(field)
        if not isinstance(value, str) or not value.strip():
            raise DataSpecError(f"{path}: field {field}: required (a non-empty string)")
        return value.strip()

    table, key = need("table"), need("key")
    for field, value in (("table", table), ("key", key)):
        if not IDENTIFIER.match(value):
            raise DataSpecError(f"{path}: field {field}: {value!r} is not a plain SQL identifier")
    statement, python = one_of(path, raw, "statement", "python", required=True)
    verify = need("verify")
    if statement:
        missing = {"last_key", "upper_key"} - set(PLACEHOLDER.findall(statement))
        if missing:
            raise DataSpecError(f"{path}: field statement: must use {' and '.join(':' + m for m in sorted(missing))} "
                                f"(one batch is the rows with :last_key < {key} <= :upper_key)")
    reversible = bool(raw.get("reversible", False))
    revert, revert_python = one_of(path, raw, "revert", "revert_python", required=False)
    if reversible and not (revert or revert_python):
        raise DataSpecError(f"{path}: field revert: required when reversible is true (or revert_python)")
    if revert and {"last_key", "upper_key"} - set(PLACEHOLDER.findall(revert)):
        raise DataSpecError(f"{path}: field revert: must use :last_key and :upper_key like the statement")
    throttle = raw.get("throttle") or {}
    if not isinstance(throttle, dict) or set(throttle) - {"rows_per_second", "pause_ms"}:
        raise DataSpecError(f"{path}: field throttle: expected {{rows_per_second: N, pause_ms: N}}")

    def number(field: str, value: object, low: float, high: float) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise DataSpecError(f"{path}: field {field}: {value!r} is not a number between {low} and {high}")
        return value

    batch_size = int(number("batch_size", raw.get("batch_size", 5000), 1, MAX_BATCH_SIZE))
    batch_seconds = float(number("batch_seconds", raw.get("batch_seconds", 0.5), 0, 60))
    fixed = batch_seconds == 0
    smallest = int(number("min_batch_size", raw.get("min_batch_size", batch_size if fixed else max(1, batch_size // 10)),
                          1, batch_size))
    largest = int(number("max_batch_size", raw.get("max_batch_size", batch_size if fixed else
                                                    min(MAX_BATCH_SIZE, batch_size * 10)), batch_size, MAX_BATCH_SIZE))
    if fixed and (smallest, largest) != (batch_size, batch_size):
        raise DataSpecError(f"{path}: field batch_seconds: 0 means every batch is batch_size ({batch_size}); give a "
                            f"target duration (e.g. 0.5) for min_batch_size/max_batch_size to mean anything")

    return DataMigrationSpec(
        name=path.stem,
        path=path,
        description=str(raw.get("description", "")),
        table=table,
        key=key,
        batch_size=batch_size,
        rows_per_second=float(number("throttle.rows_per_second", throttle.get("rows_per_second", 0), 0, 10**9)),
        pause_ms=int(number("throttle.pause_ms", throttle.get("pause_ms", 0), 0, 600_000)),
        statement=statement,
        verify=verify,
        reversible=reversible,
        revert=revert,
        lock_timeout_ms=int(number("lock_timeout_ms", raw.get("lock_timeout_ms", 2000), 100, 10_000)),
        statement_timeout_ms=int(number("statement_timeout_ms", raw.get("statement_timeout_ms", 30_000), 1000,
                                        3_600_000)),
        checksum=checksum(path, python, revert_python),
        python=python,
        revert_python=revert_python,
        batch_seconds=batch_seconds,
        min_batch_size=smallest,
        max_batch_size=largest,
    )


def checksum(path: Path, *functions: str | None) -> str:
    """Return the spec's sha256: of its file, and of the source of each function it names, so that promotion evidence,
    a rehearsal and the checkpoint all see a change of the Python code as a change of the migration."""
    from omnisphere_release.datamigrate.code import source_digest  # code.py imports this module

    digest = hashlib.sha256(path.read_bytes())
    for target in functions:
        if target:
            digest.update(source_digest(target))
    return digest.hexdigest()


def one_of(path: Path, raw: dict, sql_field: str, python_field: str, required: bool) -> tuple[str | None, str | None]:
    """Return (SQL, module:function) of a spec that gives at most one of the two fields (exactly one if required)."""
    sql_text, target = raw.get(sql_field), raw.get(python_field)
    if sql_text is not None and target is not None:
        raise DataSpecError(f"{path}: field {python_field}: give {sql_field} (SQL) or {python_field} (a Python "
                            f"function), not both")
    if target is not None:
        if not isinstance(target, str) or not PYTHON_TARGET.match(target.strip()):
            raise DataSpecError(f"{path}: field {python_field}: {target!r} is not module:function (e.g. "
                                f"datamigrations.users:copy_users)")
        return None, target.strip()
    if sql_text is None and not required:
        return None, None
    if not isinstance(sql_text, str) or not sql_text.strip():
        raise DataSpecError(f"{path}: field {sql_field}: required (a non-empty string), or {python_field}: "
                            f"module:function")
    return sql_text.strip(), None


def discover_specs(folder: Path) -> list[DataMigrationSpec]:
    """Return the specs of a service's data/ folder, sorted by name (an absent folder means none)."""
    if not folder.is_dir():
        return []
    return [load_spec(path) for path in sorted(folder.glob("*.yaml"))]
