"""Data migration specs: include/sql/<service>/data/<name>.yaml, validated before anything runs.

```yaml
description: Copy events into the partitioned events_v2 table
table: events            # the table walked in key order
key: id                  # an indexed integer column, unique (the primary key is ideal)
batch_size: 5000
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
KNOWN_KEYS = {"description", "table", "key", "batch_size", "throttle", "statement", "verify", "reversible", "revert",
              "lock_timeout_ms", "statement_timeout_ms"}


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
    statement: str
    verify: str
    reversible: bool
    revert: str | None
    lock_timeout_ms: int
    statement_timeout_ms: int
    checksum: str

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
    statement, verify = need("statement"), need("verify")
    used = set(PLACEHOLDER.findall(statement))
    missing = {"last_key", "upper_key"} - used
    if missing:
        raise DataSpecError(f"{path}: field statement: must use {' and '.join(':' + m for m in sorted(missing))} "
                            f"(one batch is the rows with :last_key < {key} <= :upper_key)")
    reversible = bool(raw.get("reversible", False))
    revert = raw.get("revert")
    if reversible and not (isinstance(revert, str) and revert.strip()):
        raise DataSpecError(f"{path}: field revert: required when reversible is true")
    if revert and {"last_key", "upper_key"} - set(PLACEHOLDER.findall(revert)):
        raise DataSpecError(f"{path}: field revert: must use :last_key and :upper_key like the statement")
    throttle = raw.get("throttle") or {}
    if not isinstance(throttle, dict) or set(throttle) - {"rows_per_second", "pause_ms"}:
        raise DataSpecError(f"{path}: field throttle: expected {{rows_per_second: N, pause_ms: N}}")

    def number(field: str, value: object, low: float, high: float) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise DataSpecError(f"{path}: field {field}: {value!r} is not a number between {low} and {high}")
        return value

    return DataMigrationSpec(
        name=path.stem,
        path=path,
        description=str(raw.get("description", "")),
        table=table,
        key=key,
        batch_size=int(number("batch_size", raw.get("batch_size", 5000), 1, 1_000_000)),
        rows_per_second=float(number("throttle.rows_per_second", throttle.get("rows_per_second", 0), 0, 10**9)),
        pause_ms=int(number("throttle.pause_ms", throttle.get("pause_ms", 0), 0, 600_000)),
        statement=statement,
        verify=verify,
        reversible=reversible,
        revert=revert.strip() if isinstance(revert, str) else None,
        lock_timeout_ms=int(number("lock_timeout_ms", raw.get("lock_timeout_ms", 2000), 100, 10_000)),
        statement_timeout_ms=int(number("statement_timeout_ms", raw.get("statement_timeout_ms", 30_000), 1000,
                                        3_600_000)),
        checksum=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def discover_specs(folder: Path) -> list[DataMigrationSpec]:
    """Return the specs of a service's data/ folder, sorted by name (an absent folder means none)."""
    if not folder.is_dir():
        return []
    return [load_spec(path) for path in sorted(folder.glob("*.yaml"))]
