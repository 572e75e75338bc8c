"""The engine's safety promises, measured against real PostgreSQL: reversibility, crashes, concurrency, locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from omnisphere_release.catalog import load_catalog
from omnisphere_release.migrations import EngineSettings, LockBusy, MigrationEngine
from omnisphere_release.migrations.engine import ADVISORY_LOCK_NAMESPACE, SCHEMA_MIGRATION_LOCK
from tests.pg import schema_dump as shared_schema_dump

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
# An advisory lock key of the tests' own: a migration file that waits for it stops at a known statement, inside its
# transaction, until the test lets it go. Tests synchronise on that, seen in pg_locks, rather than on time.
GATE = 0x7E57_6A7E
WAIT_AT_GATE = f"SELECT pg_advisory_xact_lock({GATE});"


def engine_for(dsn: str, folder: Path, **settings) -> MigrationEngine:
    return MigrationEngine("auth-service", folder, lambda: psycopg2.connect(dsn), EngineSettings(**settings),
                           applied_by="test")


def schema_dump(dsn: str, pg_bin: str) -> str:
    return shared_schema_dump(dsn, pg_bin, exclude="omnisphere_*", privileges=False)


def history(dsn: str) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT version, state FROM omnisphere_schema_history ORDER BY version")
        return cur.fetchall()


@pytest.mark.parametrize("service", ["auth-service", "billing-service", "notification-service"])
def test_up_then_down_leaves_the_schema_identical(scratch_database, devstack, service):
    catalog = load_catalog()
    before = schema_dump(scratch_database, devstack["OMNI_PG_BIN_DIR"])
    engine = engine_for(scratch_database, catalog.migrations_dir(service))
    engine.migrate("up")
    assert schema_dump(scratch_database, devstack["OMNI_PG_BIN_DIR"]) != before
    engine.migrate("down", target=0)
    assert schema_dump(scratch_database, devstack["OMNI_PG_BIN_DIR"]) == before


def hold_gate(dsn: str):
    """Take the GATE advisory lock in a session of the test's own; a migration file that takes it too stops there
    until the test closes the returned connection."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", [GATE])
    return conn


def test_sigkill_mid_migration_leaves_a_consistent_state_and_the_next_run_continues(scratch_database, pg_sessions,
                                                                                   tmp_path):
    (tmp_path / "001_a.up.sql").write_text("CREATE TABLE a (id bigint);")
    (tmp_path / "001_a.down.sql").write_text("DROP TABLE a;")
    (tmp_path / "002_b.up.sql").write_text(f"CREATE TABLE b (id bigint);\n{WAIT_AT_GATE}\n")
    (tmp_path / "002_b.down.sql").write_text("DROP TABLE b;")
    (tmp_path / "003_c.up.sql").write_text("CREATE TABLE c (id bigint);")
    (tmp_path / "003_c.down.sql").write_text("DROP TABLE c;")
    script = (
        "import sys, psycopg2; sys.path.insert(0, sys.argv[3])\n"
        "from omnisphere_release.migrations import EngineSettings, MigrationEngine\n"
        "MigrationEngine('s', __import__('pathlib').Path(sys.argv[2]), lambda: psycopg2.connect(sys.argv[1]),"
        " EngineSettings(lock_timeout_ms=600_000), applied_by='doomed').migrate('up', run_lint=False)\n")
    gate = hold_gate(scratch_database)
    try:
        process = subprocess.Popen([sys.executable, "-c", script, scratch_database, str(tmp_path),
                                    str(REPO / "plugins")])
        # 001 is committed; 002 has created its table and waits at the gate, inside its transaction.
        pg_sessions.wait_until_waiting("omni-migrate doomed", "advisory")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        gate.close()
    engine = engine_for(scratch_database, tmp_path, advisory_lock_wait_seconds=60)
    status = engine.status()
    assert [v.version for v in status.applied] == [1] and not status.dirty
    result = engine.migrate("up", run_lint=False)  # waits for the dead session's lock to go, then goes on
    assert result.versions == [2, 3]
    assert history(scratch_database) == [(1, "applied"), (2, "applied"), (3, "applied")]


def test_two_runs_at_once_one_applies_the_other_fails_fast_naming_the_holder(scratch_database, pg_sessions, tmp_path):
    (tmp_path / "001_slow.up.sql").write_text(f"CREATE TABLE slow (id bigint);\n{WAIT_AT_GATE}\n")
    (tmp_path / "001_slow.down.sql").write_text("DROP TABLE slow;")
    outcomes: dict[str, object] = {}

    def run(name: str, **settings) -> None:
        engine = MigrationEngine("auth-service", tmp_path, lambda: psycopg2.connect(scratch_database),
                                 EngineSettings(**settings), applied_by=f"run {name}")
        try:
            outcomes[name] = engine.migrate("up", run_lint=False).versions
        except LockBusy as exc:
            outcomes[name] = exc

    gate = hold_gate(scratch_database)
    first = threading.Thread(target=run, args=("one",), kwargs={"lock_timeout_ms": 600_000})
    first.start()
    try:
        # The first run holds the migration lock and is inside 001, stopped at the gate.
        pg_sessions.wait_until_waiting("omni-migrate run one", "advisory")
        holder = pg_sessions.rows(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = "
            "'advisory' AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 2",
            [ADVISORY_LOCK_NAMESPACE, SCHEMA_MIGRATION_LOCK])
        assert holder == [("omni-migrate run one",)]
        run("two", advisory_lock_wait_seconds=0.5)
        # The second run gave up while the first still held the lock: the first is still stopped at the gate.
        assert first.is_alive() and pg_sessions.is_waiting("omni-migrate run one", "advisory")
    finally:
        gate.close()
        first.join(timeout=60)
    assert not first.is_alive(), "the first run did not end after the gate opened"
    assert outcomes["one"] == [1]
    assert isinstance(outcomes["two"], LockBusy)
    assert "omni-migrate run one" in str(outcomes["two"])
    assert history(scratch_database) == [(1, "applied")]


def test_application_queries_wait_at_most_the_lock_timeout_budget(scratch_database, pg_sessions, tmp_path):
    """A long transaction holds the table; the migration's pending lock must not stall the application until it ends.

    An application query that arrives while the migration waits for its ACCESS EXCLUSIVE lock queues behind it. Without
    lock_timeout it would wait as long as the long transaction lasts; with it, the migration leaves the queue and the
    query goes on while the long transaction still holds the table. The test observes exactly that in pg_locks.
    """
    (tmp_path / "001_users.up.sql").write_text("CREATE TABLE users (id bigint PRIMARY KEY);")
    (tmp_path / "001_users.down.sql").write_text("DROP TABLE users;")
    (tmp_path / "002_users_note.up.sql").write_text("ALTER TABLE users ADD COLUMN note text;")
    (tmp_path / "002_users_note.down.sql").write_text("ALTER TABLE users DROP COLUMN note;")
    engine = engine_for(scratch_database, tmp_path, lock_timeout_ms=1000, lock_retries=20, retry_backoff_seconds=0.05)
    engine.migrate("up", target=1, run_lint=False)

    long_reader = psycopg2.connect(scratch_database)
    with long_reader.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")  # holds ACCESS SHARE until it ends, like a slow report
        cur.execute("SELECT pg_backend_pid()")
        reader_pid = cur.fetchone()[0]
    outcome: dict[str, object] = {}

    def migrate() -> None:
        try:
            outcome["result"] = engine.migrate("up", run_lint=False)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["result"] = exc

    migration = threading.Thread(target=migrate)
    migration.start()
    try:
        for _attempt in range(5):  # a query can miss an attempt's wait, when the attempt times out first: try the next
            migration_pid = pg_sessions.wait_until_waiting("omni-migrate test", "relation", "users")
            if application_query_queued_behind(scratch_database, pg_sessions, migration_pid):
                break
        else:
            pytest.fail("in 5 attempts of the migration, no application query was seen queued behind it")
        still_held = pg_sessions.rows("SELECT mode FROM pg_locks WHERE pid = %s AND relation = to_regclass('users') "
                                      "AND granted", [reader_pid])
        assert still_held == [("AccessShareLock",)], "the query went on only because the long transaction ended"
    finally:
        long_reader.rollback()  # the report ends: the migration's next attempt gets its lock
        migration.join(timeout=60)
        long_reader.close()
    assert not migration.is_alive(), "the migration did not end after the long transaction did"
    result = outcome["result"]
    assert result.versions == [2] and result.steps[0].lock_retries >= 1


def application_query_queued_behind(dsn: str, pg_sessions, migration_pid: int) -> bool:
    """Run an application query while the migration waits for its lock. Return True when the query was seen queued
    behind the migration (and then went on), False when it was not (the migration's attempt ended first)."""
    conn = psycopg2.connect(dsn, application_name="omni-test-application")
    conn.autocommit = True
    done = threading.Event()

    def query() -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM users")
        done.set()

    app = threading.Thread(target=query)
    app.start()
    deadline = time.monotonic() + pg_sessions.DEADLINE_SECONDS
    try:
        while not done.wait(0.005):
            assert time.monotonic() < deadline, "the application query neither ran nor queued behind the migration"
            if pg_sessions.rows("SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND "
                                "application_name = 'omni-test-application' AND wait_event_type = 'Lock' AND "
                                "pg_blocking_pids(pid) = ARRAY[%s]::integer[]", [migration_pid]):
                assert done.wait(pg_sessions.DEADLINE_SECONDS), (
                    "the application query stayed queued behind the migration while the long transaction held the "
                    "table: lock_timeout did not take the migration out of the queue")
                return True
        return False
    finally:
        app.join(timeout=pg_sessions.DEADLINE_SECONDS)
        conn.close()
