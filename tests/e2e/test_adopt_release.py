"""Adopting a database golang-migrate built, end to end on the devstack: psql builds auth-service at version 3 with
golang-migrate's table, the schema_migrations DAG adopts it, and a release applies only 004 and rolls back to 3."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psycopg2
import pytest

from tests.e2e.helpers import auth_service_at_version_3, run_dag
from tests.e2e.test_release_dag import DSN_VAR, SERVICE, assert_rolled_back, release, snapshot

pytestmark = pytest.mark.e2e


def query(sql: str, params=None):
    with psycopg2.connect(os.environ[DSN_VAR]) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else None


def psql(*args: str) -> None:
    """Run the devstack's psql on auth-service's database, as run-migrations.sh did (the password in the
    environment, not in the process's arguments)."""
    dsn = urlsplit(os.environ[DSN_VAR])
    env = {**os.environ, "PGHOST": dsn.hostname or "", "PGPORT": str(dsn.port), "PGUSER": unquote(dsn.username or ""),
           "PGPASSWORD": unquote(dsn.password or ""), "PGDATABASE": dsn.path.lstrip("/")}
    result = subprocess.run([str(Path(os.environ["OMNI_PG_BIN_DIR"]) / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                             *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


@pytest.fixture()
def golang_migrate_database(devstack, airflow_db, sql_dir, tmp_path, monkeypatch):
    """auth-service's database as golang-migrate left it at version 3: 001-003 run by psql, its table saying 3,
    rows in users, and none of this engine's bookkeeping."""
    migrate = auth_service_at_version_3(tmp_path, monkeypatch)  # the short-deadline catalog; then start from nothing
    assert migrate([SERVICE, "down", "--all", "--reason", "e2e: adopt from scratch"]) == 0
    forget_everything()
    migrations = sql_dir / SERVICE / "migrations"
    for up in sorted(migrations.glob("00[123]_*.up.sql")):
        psql("-f", str(up))
    psql("-c", "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL)",
         "-c", "INSERT INTO schema_migrations (version, dirty) VALUES (3, false)")
    query("INSERT INTO users (email, password_hash) SELECT 'user' || i || '@example.com', 'hash-' || i "
          "FROM generate_series(1, 40) AS i")
    yield migrate
    # 001-003 are below the adopted baseline: their down files undo what psql ran from their up files.
    assert migrate([SERVICE, "down", "--all", "--reason", "e2e: adopt cleanup",
                    "--below-baseline", "e2e: psql ran exactly these up files"]) == 0
    forget_everything()  # a test that ended before adopting leaves psql's tables and no history


def forget_everything() -> None:
    """Drop what psql built and every history, so that the database is as new (the e2e modules after this one
    start from an empty auth-service)."""
    query("DROP TABLE IF EXISTS api_tokens, sessions, users, schema_migrations, omnisphere_schema_history, "
          "omnisphere_schema_log CASCADE")


def test_adopt_then_release_applies_only_004_and_rolls_back_to_3(golang_migrate_database):
    dry = run_dag("schema_migrations", {"service": SERVICE, "action": "adopt", "reason": "e2e: adopt, dry run"})
    assert dry.state == "success" and dry.task("record_baseline") == "success", dry.tasks
    assert dry.outputs["record_baseline"]["recorded"] == [1, 2, 3]
    assert query("SELECT to_regclass('omnisphere_schema_history')") == [(None,)]  # a dry run records nothing

    adopted = run_dag("schema_migrations", {"service": SERVICE, "action": "adopt", "dry_run": False,
                                            "reason": "e2e: run-migrations.sh built it"})
    assert adopted.state == "success", adopted.tasks
    assert adopted.task("record_baseline") == "success"
    assert adopted.task("migrate_wave_1") == "skipped"  # adopting runs no migration
    assert adopted.outputs["record_baseline"] == {"service": SERVICE, "action": "adopt", "baseline": 3,
                                                  "recorded": [1, 2, 3], "dry_run": False}
    assert query("SELECT version, state FROM omnisphere_schema_history ORDER BY version") == [
        (1, "applied"), (2, "applied"), (3, "applied")]
    log = query("SELECT version, action, reason FROM omnisphere_schema_log ORDER BY id")
    assert [(v, a) for v, a, _ in log] == [(1, "baselined"), (2, "baselined"), (3, "baselined")]
    assert all(r == "golang-migrate's schema_migrations (version 3, clean): e2e: run-migrations.sh built it"
               for _, _, r in log)
    assert query("SELECT version, dirty FROM schema_migrations") == [(3, False)]  # left as it was

    # Adopting again changes nothing; the release then applies 004 alone, fails at ecs_deploy and goes back to 3.
    again = run_dag("schema_migrations", {"service": SERVICE, "action": "adopt", "dry_run": False,
                                          "reason": "e2e: again"})
    assert again.state == "success" and again.outputs["record_baseline"]["recorded"] == []
    before = snapshot()
    assert before["version"] == 3
    outcome = release("-crashloop")
    assert outcome.outputs["schema_up"]["versions"] == [4], outcome.outputs.get("schema_up")
    assert_rolled_back(outcome, before, "ecs_deploy")
    assert outcome.outputs["rollback_schema"]["reverted"] == [4]
    assert query("SELECT version FROM omnisphere_schema_history ORDER BY version") == [(1,), (2,), (3,)]
    assert query("SELECT count(*) FROM users") == [(40,)]
    assert query("SELECT version, dirty FROM schema_migrations") == [(3, False)]


def test_a_dirty_golang_migrate_version_is_refused_naming_it(golang_migrate_database):
    query("UPDATE schema_migrations SET dirty = true")
    outcome = run_dag("schema_migrations", {"service": SERVICE, "action": "adopt", "dry_run": False,
                                            "reason": "e2e: dirty"})
    assert outcome.state == "failed" and outcome.task("record_baseline") == "failed", outcome.tasks
    assert query("SELECT to_regclass('omnisphere_schema_history')") == [(None,)]  # nothing recorded
    wrong = run_dag("schema_migrations", {"service": "all", "action": "baseline", "target_version": 3,
                                          "dry_run": False, "reason": "e2e"})
    assert wrong.state == "failed" and wrong.task("check_params") == "failed"
