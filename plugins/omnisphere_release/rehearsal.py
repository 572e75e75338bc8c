"""Rehearsal on a copy of production: a scratch database to restore a backup into, and a watch on the locks the
pending migrations take there. Importable without Airflow; the ``rehearse_<service>`` DAG drives it.

The copy lives on a scratch server (the Airflow connection ``omni_pg_rehearsal``, a role that may create databases),
never on the production server itself: a rehearsal must not compete with production for its disks and locks.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from psycopg2 import sql

from omnisphere_release.migrations.files import split_statements

REHEARSAL_CONN_ID = "omni_pg_rehearsal"
# Scratch databases are named so that a person (and drop_stale) can tell them apart from anything else.
SCRATCH_PREFIX = "rehearse_"
# PostgreSQL's table lock modes, weakest first (the documentation's conflict table, in order).
LOCK_MODES = ("AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock",
              "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")
# Which everyday statements of the application each mode blocks, for the person reading the rehearsal's report.
BLOCKS = {
    "AccessExclusiveLock": "blocks every read and write of the table",
    "ExclusiveLock": "blocks writes (reads go on)",
    "ShareRowExclusiveLock": "blocks writes (reads go on)",
    "ShareLock": "blocks writes (reads go on)",
    "ShareUpdateExclusiveLock": "blocks DDL and VACUUM only",
    "RowExclusiveLock": "blocks only DDL-level locks",
    "RowShareLock": "blocks only exclusive locks",
    "AccessShareLock": "blocks only ACCESS EXCLUSIVE",
}


def scratch_name(service: str, run_id: str) -> str:
    """Return the scratch database's name for a run: ``rehearse_<service>_<run>``, at most 63 bytes, lower case."""
    slug = re.sub(r"[^a-z0-9]+", "_", f"{service}_{run_id}".lower()).strip("_")
    return (SCRATCH_PREFIX + slug)[:63]


class ScratchDatabase:
    """A database created for one rehearsal on the scratch server, and dropped after it."""

    def __init__(self, admin_kwargs: dict[str, Any], name: str) -> None:
        if not name.startswith(SCRATCH_PREFIX):
            raise ValueError(f"scratch database names start with {SCRATCH_PREFIX!r}; got {name!r}")
        self.admin_kwargs = admin_kwargs
        self.name = name

    @property
    def connect_kwargs(self) -> dict[str, Any]:
        return {**self.admin_kwargs, "dbname": self.name}

    def connect(self, application_name: str | None = None) -> Any:
        extra = {"application_name": application_name} if application_name else {}
        return psycopg2.connect(**{**self.connect_kwargs, **extra})

    def _admin(self, statement: sql.Composable) -> None:
        conn = psycopg2.connect(**self.admin_kwargs)
        try:
            conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def create(self) -> None:
        """Create the database afresh (a copy left by an earlier try of the same run is dropped first)."""
        self.drop()
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))

    def drop(self) -> bool:
        """Drop the database if it exists, ending its sessions; return whether it existed."""
        conn = psycopg2.connect(**self.admin_kwargs)
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [self.name])
                existed = cur.fetchone() is not None
        finally:
            conn.close()
        if existed:
            self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name)))
        return existed


@dataclass
class LockRecord:
    relation: str
    mode: str
    seen_for_seconds: float = 0.0

    def describe(self) -> str:
        return f"{self.mode} on {self.relation} ({BLOCKS.get(self.mode, '')}, seen for ~{self.seen_for_seconds:.1f}s)"


OWN_LOCKS = ("SELECT coalesce(n.nspname || '.' || c.relname, l.relation::text), l.mode FROM pg_locks l "
             "LEFT JOIN pg_class c ON c.oid = l.relation LEFT JOIN pg_namespace n ON n.oid = c.relnamespace "
             "WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.granted "
             "AND coalesce(n.nspname, '') NOT IN ('pg_catalog', 'information_schema')")


# Statements that cannot run inside a transaction block: the lock watch samples them instead of the probe.
OUTSIDE_TRANSACTION = re.compile(r"\bCONCURRENTLY\b|^\s*(VACUUM|CREATE\s+DATABASE|DROP\s+DATABASE)\b",
                                 re.IGNORECASE)


def probe_locks(conn: Any, statements: list[str], lock_timeout_ms: int) -> list[LockRecord]:
    """Run a migration's statements in one transaction on the copy, read the table locks held at its end, and roll
    it back: the exact strongest lock of each table they touch, which sampling from outside misses when a statement is
    quick (a quick ACCESS EXCLUSIVE still queues every query behind a long one on a busy table). Statements that
    cannot run in a transaction (CREATE INDEX CONCURRENTLY) are left to the lock watch."""
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = %s", [f"{lock_timeout_ms}ms"])
            for statement in statements:
                if not OUTSIDE_TRANSACTION.search(statement):
                    cur.execute(statement)
            cur.execute(OWN_LOCKS)
            held = cur.fetchall()
    finally:
        conn.rollback()
    strongest: dict[str, str] = {}
    for relation, mode in held:
        if relation not in strongest or LOCK_MODES.index(mode) > LOCK_MODES.index(strongest[relation]):
            strongest[str(relation)] = str(mode)
    return sorted((LockRecord(r, m) for r, m in strongest.items()), key=lambda r: -LOCK_MODES.index(r.mode))


@dataclass
class LockWatch:
    """Sample pg_locks every ``interval`` seconds for the sessions named ``application_name``, and keep the strongest
    table lock each relation was held in (and for how long it was seen). A sample misses locks held for less than
    the interval: what is reported is a floor, which is what matters for a migration that would queue the
    application behind it."""

    admin_kwargs: dict[str, Any]
    application_name: str
    interval: float = 0.05
    locks: dict[str, LockRecord] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: str | None = None

    def __enter__(self) -> LockWatch:
        self._thread = threading.Thread(target=self._run, name="omni-lock-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        query = ("SELECT coalesce(n.nspname || '.' || c.relname, l.relation::text), l.mode FROM pg_locks l "
                 "JOIN pg_stat_activity a ON a.pid = l.pid LEFT JOIN pg_class c ON c.oid = l.relation "
                 "LEFT JOIN pg_namespace n ON n.oid = c.relnamespace "
                 "WHERE a.application_name = %s AND l.locktype = 'relation' AND l.granted "
                 "AND coalesce(n.nspname, '') NOT IN ('pg_catalog', 'information_schema')")
        try:
            conn = psycopg2.connect(**self.admin_kwargs)
        except psycopg2.Error as exc:
            self._error = str(exc).strip()
            return
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                last = time.monotonic()
                while not self._stop.wait(self.interval):
                    now = time.monotonic()
                    cur.execute(query, [self.application_name])
                    for relation, mode in cur.fetchall():
                        self._record(str(relation), str(mode), now - last)
                    last = now
        except psycopg2.Error as exc:
            self._error = str(exc).strip()
        finally:
            conn.close()

    def _record(self, relation: str, mode: str, elapsed: float) -> None:
        known = self.locks.get(relation)
        if known is None or LOCK_MODES.index(mode) > LOCK_MODES.index(known.mode):
            self.locks[relation] = LockRecord(relation, mode, elapsed)
        elif known.mode == mode:
            known.seen_for_seconds += elapsed

    def heaviest(self, limit: int = 10) -> list[LockRecord]:
        """Return the strongest locks seen, strongest (then longest) first."""
        return sorted(self.locks.values(), key=lambda r: (-LOCK_MODES.index(r.mode), -r.seen_for_seconds))[:limit]

    @property
    def error(self) -> str | None:
        return self._error


def apply_measured(engine: Any, scratch: ScratchDatabase, plan: Any, application_name: str, lock_timeout_ms: int,
                   log: Any) -> dict[str, Any]:
    """Apply ``plan``'s migrations to the copy one at a time, as a release would (the engine, with the service's lock
    settings), each one timed and its table locks probed first; return the steps, the locks (strongest first) and the
    seconds. Raises what the engine raises."""
    steps: list[dict[str, Any]] = []
    locks: list[dict[str, Any]] = []
    with LockWatch(scratch.admin_kwargs, application_name) as watch:
        for migration in plan.steps:
            probed = _probe(scratch, migration, lock_timeout_ms)
            result = engine.migrate("up", migration.version, reason="rehearsal on a copy")
            seconds = sum(step.seconds for step in result.steps)
            log.info("Migration %s (%s): %.2fs on the copy; table locks: %s.", migration.version, migration.name,
                     seconds, "; ".join(lock.describe() for lock in probed) or "none")
            steps.append({"version": migration.version, "name": migration.name, "seconds": round(seconds, 3),
                          "locks": [{"relation": lock.relation, "mode": lock.mode} for lock in probed]})
            locks += [{"relation": lock.relation, "mode": lock.mode, "version": migration.version} for lock in probed]
    if watch.error:
        log.warning("The lock watch stopped early (%s): locks of no-transaction statements may be missing.",
                    watch.error)
    for lock in watch.heaviest():  # what the probe cannot see: statements that run outside a transaction
        if not any(known["relation"] == lock.relation for known in locks):
            locks.append({"relation": lock.relation, "mode": lock.mode, "version": None})
    locks.sort(key=lambda lock: -LOCK_MODES.index(lock["mode"]))
    return {"steps": steps, "locks": locks, "seconds": round(sum(step["seconds"] for step in steps), 2)}


def _probe(scratch: ScratchDatabase, migration: Any, lock_timeout_ms: int) -> list[LockRecord]:
    # A no-transaction file runs statement by statement, as the engine runs it.
    statements = split_statements(migration.up.sql) if migration.up.no_transaction else [migration.up.sql]
    conn = scratch.connect()
    try:
        return probe_locks(conn, statements, lock_timeout_ms)
    except psycopg2.Error:
        return []  # the engine's own apply reports the error, with its migration
    finally:
        conn.close()
