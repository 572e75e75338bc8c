"""The schema migration engine against real PostgreSQL: transactions, locks, drift, dirty state, dry runs, CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from omnisphere_release.migrations import (
    EngineSettings,
    InvalidMigrationInput,
    LockBusy,
    MigrationEngine,
    MigrationFailed,
)
from omnisphere_release.migrations.engine import NOTHING_APPLIED
from omnisphere_release.migrations.errors import LockNotGranted

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def make_engine(dsn: str, folder: Path, log: logging.Logger | None = None, **settings) -> MigrationEngine:
    defaults = {"lock_timeout_ms": 200, "statement_timeout_ms": 5000, "lock_retries": 2,
                "retry_backoff_seconds": 0.1, "advisory_lock_wait_seconds": 1.0}
    return MigrationEngine("auth-service", folder, lambda: psycopg2.connect(dsn),
                           EngineSettings(**{**defaults, **settings}), applied_by="test", log=log)


def query(dsn: str, sql: str, params=None):
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else None


def tables(dsn: str) -> set[str]:
    return {r[0] for r in query(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


@pytest.fixture()
def auth_dir(sql_dir: Path) -> Path:
    return sql_dir / "auth-service" / "migrations"


def test_up_applies_every_file_and_records_history(scratch_database, auth_dir):
    result = make_engine(scratch_database, auth_dir).migrate("up", reason="first install")
    assert result.versions == [1, 2, 3, 4] and (result.from_version, result.to_version) == (NOTHING_APPLIED, 4)
    assert {"users", "sessions", "api_tokens"} <= tables(scratch_database)
    rows = query(scratch_database, "SELECT version, state, applied_by, checksum_up FROM omnisphere_schema_history "
                                   "ORDER BY version")
    assert [(r[0], r[1], r[2]) for r in rows] == [(v, "applied", "test") for v in (1, 2, 3, 4)]
    assert all(len(r[3]) == 64 for r in rows)
    log = query(scratch_database, "SELECT version, action, reason FROM omnisphere_schema_log ORDER BY id")
    assert log[0] == (1, "applied", "first install")
    index = query(scratch_database, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'users_last_login_at_idx'::regclass")
    assert index == [(True,)]  # built CONCURRENTLY, outside a transaction


def test_up_to_a_target_then_down_to_a_target_in_reverse(scratch_database, auth_dir):
    engine = make_engine(scratch_database, auth_dir)
    assert engine.migrate("up", target=2).versions == [1, 2]
    assert engine.status().current_version == 2
    assert engine.migrate("up").versions == [3, 4]
    down = engine.migrate("down", target=1)
    assert down.versions == [4, 3, 2] and down.to_version == 1
    assert tables(scratch_database) == {"users", "omnisphere_schema_history", "omnisphere_schema_log",
                                      "omnisphere_operation_lock"}  # the service lease lives beside the history
    assert engine.migrate("down").versions == [1]  # without a target: one step


def test_failing_migration_leaves_nothing_of_itself(scratch_database, auth_dir):
    (auth_dir / "005_broken.up.sql").write_text(
        "CREATE TABLE half_done (id bigint);\nALTER TABLE no_such_table ADD COLUMN x text;\n")
    (auth_dir / "005_broken.down.sql").write_text("DROP TABLE half_done;\n")
    engine = make_engine(scratch_database, auth_dir)
    with pytest.raises(MigrationFailed, match=r"005_broken failed and was rolled back.*no_such_table"):
        engine.migrate("up")
    assert "half_done" not in tables(scratch_database)
    assert engine.status().current_version == 4  # the earlier migrations of the run stay applied


def test_dry_run_and_plan_change_nothing(scratch_database, auth_dir):
    engine = make_engine(scratch_database, auth_dir)
    result = engine.migrate("up", dry_run=True)
    assert result.dry_run and [m.version for m in result.plan.steps] == [1, 2, 3, 4]
    assert "CREATE TABLE users" in result.plan.render()
    assert tables(scratch_database) == set()  # not even the history table


def test_dry_run_fails_on_blocking_lint_findings(scratch_database, auth_dir):
    (auth_dir / "005_email_idx.up.sql").write_text("CREATE INDEX users_email_idx ON users (email);")
    (auth_dir / "005_email_idx.down.sql").write_text("DROP INDEX users_email_idx;")
    engine = make_engine(scratch_database, auth_dir)
    engine.migrate("up", target=4)
    query(scratch_database, "INSERT INTO users (email, password_hash) VALUES ('a@example.com', 'x')")  # a lock on an empty table is advice
    with pytest.raises(InvalidMigrationInput, match="005_email_idx.up.sql:1: require-concurrent-index-creation"):
        engine.migrate("up", dry_run=True)
    with pytest.raises(InvalidMigrationInput, match="require-concurrent-index-creation"):
        engine.migrate("up")
    assert engine.status().current_version == 4


def test_changed_applied_file_is_refused_until_acknowledged(scratch_database, auth_dir):
    engine = make_engine(scratch_database, auth_dir)
    engine.migrate("up", target=1)
    path = auth_dir / "001_create_users.up.sql"
    path.write_text(path.read_text() + "\n-- reformatted\n")
    with pytest.raises(InvalidMigrationInput, match="001_create_users.up.sql: checksum .* differs"):
        engine.migrate("up")
    assert engine.status().current_version == 1
    engine.migrate("up", acknowledge_drift="comment-only edit, reviewed in PR 42")
    rows = query(scratch_database, "SELECT drift_acknowledged FROM omnisphere_schema_history WHERE version = 1")
    assert rows == [("comment-only edit, reviewed in PR 42",)]
    assert engine.status().current_version == 4


def test_out_of_order_file_is_refused(scratch_database, tmp_path):
    for version, table in ((1, "a"), (5, "e")):
        (tmp_path / f"00{version}_create_{table}.up.sql").write_text(f"CREATE TABLE {table} (id bigint);")
        (tmp_path / f"00{version}_create_{table}.down.sql").write_text(f"DROP TABLE {table};")
    engine = make_engine(scratch_database, tmp_path)
    engine.migrate("up")
    (tmp_path / "003_create_c.up.sql").write_text("CREATE TABLE c (id bigint);")
    (tmp_path / "003_create_c.down.sql").write_text("DROP TABLE c;")
    with pytest.raises(InvalidMigrationInput, match=r"003_create_c.up.sql \(version 3\) is older than the applied version 5"):
        engine.migrate("up")
    assert "c" not in tables(scratch_database)


def test_invalid_targets_are_refused_before_any_change(scratch_database, auth_dir):
    engine = make_engine(scratch_database, auth_dir)
    with pytest.raises(InvalidMigrationInput, match="target version 9 has no migration file"):
        engine.migrate("up", target=9)
    engine.migrate("up", target=2)
    with pytest.raises(InvalidMigrationInput, match="below the current version 2; use direction 'down'"):
        engine.migrate("up", target=1)
    with pytest.raises(InvalidMigrationInput, match="above the current version"):
        engine.migrate("down", target=4)
    assert engine.status().current_version == 2


def test_irreversible_migration_cannot_be_reverted(scratch_database, auth_dir):
    (auth_dir / "005_drop_tokens.up.sql").write_text(
        "-- omni:irreversible token rows are deleted\n"
        "-- omni:lint-ignore ban-drop-table no client reads api_tokens since 2.0\nDROP TABLE api_tokens;")
    engine = make_engine(scratch_database, auth_dir)
    engine.migrate("up")
    with pytest.raises(InvalidMigrationInput, match="005_drop_tokens is irreversible .*restore the backup"):
        engine.migrate("down")


def test_lock_timeout_retries_then_gives_up_without_queueing(scratch_database, auth_dir):
    engine = make_engine(scratch_database, auth_dir)
    engine.migrate("up", target=3)
    (auth_dir / "004_users_last_login.up.sql").write_text("ALTER TABLE users ADD COLUMN last_login_at timestamptz;")
    (auth_dir / "004_users_last_login.down.sql").write_text("ALTER TABLE users DROP COLUMN last_login_at;")
    blocker = psycopg2.connect(scratch_database)
    try:
        with blocker.cursor() as cur:  # an application transaction that holds the table, and never ends by itself
            cur.execute("LOCK TABLE users IN ACCESS SHARE MODE")
        # Returning at all while the blocker holds the table is the proof that the migration did not queue behind it.
        with pytest.raises(LockNotGranted, match=r"could not get its lock within lock_timeout \(200 ms\) after 3 attempts"):
            engine.migrate("up")
        # The application transaction ends between two attempts (on the engine's first retry warning): the next
        # attempt goes through.
        log = logging.getLogger(f"{__name__}.retry")
        end_on_first_retry = RunOnLog("retry 1 of", blocker.rollback)
        log.addHandler(end_on_first_retry)
        try:
            result = make_engine(scratch_database, auth_dir, log=log).migrate("up")
        finally:
            log.removeHandler(end_on_first_retry)
        assert result.versions == [4] and result.steps[0].lock_retries == 1
    finally:
        blocker.close()


class RunOnLog(logging.Handler):
    """Call ``action`` when a log record's message contains ``text``: a test then acts at a point the code under test
    announces, instead of after a guessed time."""

    def __init__(self, text: str, action) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.action = text, action

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.action()


def test_statement_timeout_rolls_back(scratch_database, auth_dir):
    (auth_dir / "005_slow.up.sql").write_text("SELECT pg_sleep(60);")  # cannot end before the timeout
    (auth_dir / "005_slow.down.sql").write_text("SELECT 1;")
    engine = make_engine(scratch_database, auth_dir, statement_timeout_ms=1000)
    with pytest.raises(MigrationFailed, match=r"005_slow exceeded statement_timeout \(1000 ms\)"):
        engine.migrate("up")
    assert engine.status().current_version == 4


def test_second_run_waits_then_names_the_holder(scratch_database, auth_dir):
    holder = make_engine(scratch_database, auth_dir)
    conn = psycopg2.connect(scratch_database)
    try:
        with conn.cursor() as cur:
            cur.execute("SET application_name = 'omni-migrate dag=release_auth-service run=manual__1'")
            cur.execute("SELECT pg_advisory_lock(%s, %s)", [0x4F4D4E49, 1])
        with pytest.raises(LockBusy, match=r"another migration run holds the lock: 'omni-migrate dag=release_auth-service run=manual__1' \(pid \d+"):
            holder.migrate("up")
    finally:
        conn.close()
    assert holder.migrate("up").versions == [1, 2, 3, 4]


def test_interrupted_no_transaction_migration_leaves_a_dirty_explained_state(scratch_database, auth_dir):
    (auth_dir / "005_idx.up.sql").write_text(
        "-- omni:no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS users_email_lower_idx ON users (lower(email));\n"
        "CREATE INDEX CONCURRENTLY broken_idx ON no_such_table (id);\n")
    (auth_dir / "005_idx.down.sql").write_text(
        "-- omni:no-transaction\nDROP INDEX CONCURRENTLY IF EXISTS users_email_lower_idx;\n")
    engine = make_engine(scratch_database, auth_dir)
    with pytest.raises(MigrationFailed, match="marked dirty"):
        engine.migrate("up")
    status = engine.status()
    assert [d.version for d in status.dirty] == [5] and "no_such_table" in status.dirty[0].error
    with pytest.raises(InvalidMigrationInput, match=r"005_idx was interrupted .* resolve --version 5"):
        engine.migrate("up")
    engine.resolve(5, "applied", "first index exists, second statement was a typo fixed in 006")
    assert engine.status().current_version == 5 and not engine.status().dirty


def test_cli_exit_codes_and_all_in_dependency_order(devstack, sql_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugins")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "omnisphere_release.migrations", *args], capture_output=True,
                              text=True, env=env, timeout=120)

    up = cli("all", "up", "--reason", "cli test")
    assert up.returncode == 0, up.stderr
    assert up.stdout.index("auth-service") < up.stdout.index("billing-service") < up.stdout.index("notification-service")
    status = cli("all", "status")
    assert "auth-service: version 4" in status.stdout and status.returncode == 0
    bad = cli("payments-service", "up")
    assert bad.returncode == 2 and "unknown service 'payments-service'" in bad.stderr
    bad_target = cli("auth-service", "up", "--to", "99", "--reason", "cli test")
    assert bad_target.returncode == 2 and "target version 99" in bad_target.stderr
    (sql_dir / "billing-service" / "migrations" / "005_fails.up.sql").write_text("SELECT * FROM nowhere;")
    (sql_dir / "billing-service" / "migrations" / "005_fails.down.sql").write_text("SELECT 1;")
    failed = cli("billing-service", "up", "--reason", "cli test")
    assert failed.returncode == 1 and "005_fails failed" in failed.stderr
    down = cli("all", "down", "--reason", "cli test")
    assert down.returncode == 0
    assert down.stdout.index("notification-service") < down.stdout.index("billing-service") < down.stdout.index("auth-service")
    for service in ("auth-service", "billing-service", "notification-service"):
        assert cli(service, "down", "--to", "0", "--reason", "cli test").returncode == 0
