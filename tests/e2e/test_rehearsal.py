"""rehearse_<service> end to end on the devstack: a copy of the database is restored on the scratch server, migrated,
checked, measured and dropped; the environment itself is never written to, whether the rehearsal passes or fails."""

from __future__ import annotations

import json
import os
import uuid

import boto3
import psycopg2
import pytest

from devstack.aws import BACKUP_BUCKET
from tests.e2e.helpers import auth_service_at_version_3, run_dag
from tests.pg import schema_dump

pytestmark = pytest.mark.e2e
SERVICE = "auth-service"
DSN_VAR = "OMNI_PG_DSN_AUTH_SERVICE"


@pytest.fixture()
def rehearsal_env(devstack, airflow_db, sql_dir, tmp_path, monkeypatch):
    """auth-service at version 3 with users, a verified backup of it, and the scratch server's connection."""
    from omnisphere_release.hooks.backups import BackupHook
    from omnisphere_release.hooks.postgres import ServiceDatabaseHook

    admin = devstack["OMNI_PG_ADMIN_DSN"]
    assert os.environ["AIRFLOW_CONN_OMNI_PG_REHEARSAL"]  # the devstack's scratch server
    dsn = os.environ[DSN_VAR]
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('users') IS NOT NULL")
        if cur.fetchone()[0]:
            cur.execute("TRUNCATE users CASCADE")
    auth_service_at_version_3(tmp_path, monkeypatch)
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO users (email, password_hash) VALUES (%s, %s)",
                        [(f"user{i}@example.com", f"hash-{i}") for i in range(500)])
    key = f"{SERVICE}/rehearsal-test-{uuid.uuid4().hex[:8]}/backup.dump"
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    BackupHook(ServiceDatabaseHook("omni_pg_auth_service").connect_kwargs(), s3).dump_to_s3(BACKUP_BUCKET, key)
    return {"backup_uri": f"s3://{BACKUP_BUCKET}/{key}", "sql_dir": sql_dir, "admin": admin,
            "before": (schema_dump(dsn, os.environ["OMNI_PG_BIN_DIR"]), users(dsn))}


def users(dsn: str) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, email FROM users ORDER BY id")
        return cur.fetchall()


def scratch_databases(admin: str) -> list[str]:
    with psycopg2.connect(admin) as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'rehearse\\_%'")
        return [row[0] for row in cur.fetchall()]


def assert_untouched(env: dict) -> None:
    dsn = os.environ[DSN_VAR]
    assert (schema_dump(dsn, os.environ["OMNI_PG_BIN_DIR"]), users(dsn)) == env["before"]
    assert scratch_databases(env["admin"]) == [], "the copy of the database was left behind"


def test_a_rehearsal_measures_the_pending_migration_and_its_locks_on_a_copy(rehearsal_env):
    outcome = run_dag(f"rehearse_{SERVICE}", {"environment": "staging", "backup_uri": rehearsal_env["backup_uri"]})

    assert outcome.state == "success", outcome.tasks
    assert set(outcome.tasks.values()) == {"success"}, outcome.tasks
    migrations = outcome.outputs["apply_migrations"]
    assert (migrations["from_version"], migrations["to_version"]) == (3, 4)
    assert [step["version"] for step in migrations["steps"]] == [4]
    # 004 adds a column to users: ALTER TABLE takes ACCESS EXCLUSIVE, the lock a release must plan its window for.
    users_lock = next(lock for lock in migrations["locks"] if lock["relation"] == "public.users")
    assert (users_lock["mode"], users_lock["version"]) == ("AccessExclusiveLock", 4)
    assert migrations["steps"][0]["locks"][0] == {"relation": "public.users", "mode": "AccessExclusiveLock"}
    report = outcome.outputs["rehearsal_report"]
    assert report["outcome"] == "passed" and report["environment"] == "staging"
    assert report["copy"]["backup_source"] == "the backup named by param backup_uri"
    # The report is evidence: kept where preflight's window-fit check reads it.
    bucket = os.environ.get("AIRFLOW_VAR_OMNI_EVIDENCE_BUCKET")
    if bucket:
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        kept = s3.get_object(Bucket=bucket, Key=f"rehearsals/{SERVICE}/staging/"
                                                 f"{outcome.run_id.replace(':', '-').replace('+', '-')}.json")
        assert json.loads(kept["Body"].read())["migrations"]["to_version"] == 4
    assert_untouched(rehearsal_env)


def test_a_migration_that_fails_on_the_copy_fails_the_rehearsal_and_changes_nothing(rehearsal_env):
    migrations = rehearsal_env["sql_dir"] / SERVICE / "migrations"
    (migrations / "005_broken.up.sql").write_text("ALTER TABLE users ADD COLUMN nickname text NOT NULL;\n"
                                                  "SELECT no_such_function();\n")
    (migrations / "005_broken.down.sql").write_text("ALTER TABLE users DROP COLUMN nickname;\n")

    outcome = run_dag(f"rehearse_{SERVICE}", {"environment": "staging", "backup_uri": rehearsal_env["backup_uri"]})

    assert outcome.state == "failed", outcome.tasks
    assert outcome.task("apply_migrations") == "failed"
    assert outcome.task("integrity_check") == "upstream_failed"
    assert outcome.task("drop_copy") == "success"
    assert outcome.task("rehearsal_report") == "failed"  # it fails the run once the report is kept
    assert_untouched(rehearsal_env)
