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
from tests.pg import schema_dump as shared_schema_dump

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def engine_for(dsn: str, folder: Path, **settings) -> MigrationEngine:
    return MigrationEngine("auth-service", folder, lambda: psycopg2.connect(dsn), EngineSettings(**settings),
                           applied_by="test")


def schema_dump(dsn: str, pg_bin: str) -> str:
    return shared_schema_dump(dsn, pg_bin, exclude="omnisphere_schema_*", privileges=False)


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


def test_sigkill_mid_migration_leaves_a_consistent_state_and_the_next_run_continues(scratch_database, tmp_path):
    (tmp_path / "001_a.up.sql").write_text("CREATE TABLE a (id bigint);")
    (tmp_path / "001_a.down.sql").write_text("DROP TABLE a;")
    (tmp_path / "002_b.up.sql").write_text("CREATE TABLE b (id bigint);\nSELECT pg_sleep(2);\n")
    (tmp_path / "002_b.down.sql").write_text("DROP TABLE b;")
    (tmp_path / "003_c.up.sql").write_text("CREATE TABLE c (id bigint);")
    (tmp_path / "003_c.down.sql").write_text("DROP TABLE c;")
    script = (
        "import sys, psycopg2; sys.path.insert(0, sys.argv[3])\n"
        "from omnisphere_release.migrations import MigrationEngine\n"
        "MigrationEngine('s', __import__('pathlib').Path(sys.argv[2]), lambda: psycopg2.connect(sys.argv[1]),"
        " applied_by='doomed').migrate('up', run_lint=False)\n")
    process = subprocess.Popen([sys.executable, "-c", script, scratch_database, str(tmp_path), str(REPO / "plugins")])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # wait until 002 is running
        with psycopg2.connect(scratch_database) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%%pg_sleep(2)%%' AND pid <> pg_backend_pid()")
            if cur.fetchone()[0]:
                break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    engine = engine_for(scratch_database, tmp_path, advisory_lock_wait_seconds=10)
    status = engine.status()
    assert [v.version for v in status.applied] == [1] and not status.dirty
    result = engine.migrate("up", run_lint=False)  # waits for the dead session's lock to go, then goes on
    assert result.versions == [2, 3]
    assert history(scratch_database) == [(1, "applied"), (2, "applied"), (3, "applied")]


def test_two_runs_at_once_one_applies_the_other_fails_fast_naming_the_holder(scratch_database, tmp_path):
    (tmp_path / "001_slow.up.sql").write_text("CREATE TABLE slow (id bigint);\nSELECT pg_sleep(1.5);\n")
    (tmp_path / "001_slow.down.sql").write_text("DROP TABLE slow;")
    outcomes: dict[str, object] = {}

    def run(name: str) -> None:
        engine = MigrationEngine("auth-service", tmp_path, lambda: psycopg2.connect(scratch_database),
                                 EngineSettings(advisory_lock_wait_seconds=0.5), applied_by=f"run {name}")
        try:
            outcomes[name] = engine.migrate("up", run_lint=False).versions
        except LockBusy as exc:
            outcomes[name] = exc

    first = threading.Thread(target=run, args=("one",))
    first.start()
    time.sleep(0.3)
    started = time.monotonic()
    run("two")
    waited = time.monotonic() - started
    first.join()
    assert outcomes["one"] == [1]
    assert isinstance(outcomes["two"], LockBusy)
    assert "omni-migrate run one" in str(outcomes["two"])
    assert waited < 1.4, "the second run should give up after its bounded wait, before the first run ends"
    assert history(scratch_database) == [(1, "applied")]


def test_application_queries_wait_at_most_the_lock_timeout_budget(scratch_database, tmp_path):
    """A long transaction holds the table; the migration's pending lock must not stall the application for long."""
    (tmp_path / "001_users.up.sql").write_text("CREATE TABLE users (id bigint PRIMARY KEY);")
    (tmp_path / "001_users.down.sql").write_text("DROP TABLE users;")
    (tmp_path / "002_users_note.up.sql").write_text("ALTER TABLE users ADD COLUMN note text;")
    (tmp_path / "002_users_note.down.sql").write_text("ALTER TABLE users DROP COLUMN note;")
    budget_ms = 300
    engine = engine_for(scratch_database, tmp_path, lock_timeout_ms=budget_ms, lock_retries=3,
                        retry_backoff_seconds=0.3)
    engine.migrate("up", target=1, run_lint=False)

    long_reader = psycopg2.connect(scratch_database)
    with long_reader.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")  # holds ACCESS SHARE until it ends, like a slow report
    waits: list[float] = []
    stop = threading.Event()

    def application() -> None:
        conn = psycopg2.connect(scratch_database)
        conn.autocommit = True
        with conn.cursor() as cur:
            while not stop.is_set():
                t0 = time.monotonic()
                cur.execute("SELECT count(*) FROM users")
                waits.append(time.monotonic() - t0)
                time.sleep(0.01)
        conn.close()

    app = threading.Thread(target=application)
    app.start()
    threading.Timer(1.2, long_reader.rollback).start()  # the report ends while the migration is retrying
    try:
        result = engine.migrate("up", run_lint=False)
    finally:
        stop.set()
        app.join()
        long_reader.close()
    assert result.versions == [2] and result.steps[0].lock_retries >= 1
    assert len(waits) > 20
    # Without lock_timeout the application would queue behind the migration for the whole 1.2 s.
    assert max(waits) < budget_ms / 1000 + 0.4, f"an application query waited {max(waits):.2f}s"
