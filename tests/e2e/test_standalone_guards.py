"""The standalone paths are guarded: in production, schema_migrations and data_migrations change a database only with
a reason, inside the service's maintenance window (or forced with a reason), and after a verified backup of it taken
before the first change; elsewhere the guards are off. A conf key neither DAG knows is refused at its first task.

Each test runs in one environment of the devstack (param environment): its fixture points this module's DSNs at
that environment's databases. Each test gets a backup bucket of its own, so "no backup was taken" is an empty bucket.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import psycopg2
import pytest

from omnisphere_release.locks import ServiceLock
from omnisphere_release.operators.common import safe_key
from tests.e2e.helpers import RunOutcome, run_dag

pytestmark = pytest.mark.e2e
SERVICES = ("auth-service", "billing-service", "notification-service")
LATEST = {"auth-service": 4, "billing-service": 4, "notification-service": 3}
BILLING = "billing-service"
DATA_MIGRATION = f"{BILLING}/backfill_invoice_due_dates"
INVOICES = 30


def dsn(service: str) -> str:
    return os.environ[f"OMNI_PG_DSN_{service.upper().replace('-', '_')}"]


def query(service: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg2.connect(dsn(service)) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def version_of(service: str) -> int:
    if not query(service, "SELECT to_regclass('omnisphere_schema_history') IS NOT NULL")[0][0]:
        return 0
    applied = "SELECT coalesce(max(version), 0) FROM omnisphere_schema_history WHERE state = 'applied'"
    return query(service, applied)[0][0]


def versions() -> list[int]:
    return [version_of(s) for s in SERVICES]


def first_applied_at(service: str) -> datetime:
    return query(service, "SELECT min(applied_at) FROM omnisphere_schema_history WHERE state = 'applied'")[0][0]


def s3():
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def migrate_cli(*argv: str) -> None:
    from omnisphere_release.migrations.__main__ import main

    assert main([*argv, "--reason", "e2e: test reset"]) == 0


@pytest.fixture()
def clean_databases(devstack, airflow_db):
    """Start and end each test with every service database at version 0."""
    def reset() -> None:
        for service in SERVICES:
            migrate_cli(service, "down", "--to", "0")

    reset()
    yield
    reset()


@pytest.fixture()
def bucket(devstack, monkeypatch) -> str:
    """A backup bucket of the test's own (encrypted by default, as the runbook asks), named by both environments'
    Variables."""
    name = f"omni-guards-{uuid.uuid4().hex[:8]}"
    client = s3()
    client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    client.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    monkeypatch.setenv("AIRFLOW_VAR_OMNI_BACKUP_BUCKET", name)
    monkeypatch.setenv("AIRFLOW_VAR_OMNI_BACKUP_BUCKET_PRODUCTION", name)
    return name


# The conf of a run in each environment of the catalog (param environment; staging is the default).
PRODUCTION = {"environment": "production"}
STAGING = {"environment": "staging"}


@pytest.fixture()
def production(monkeypatch, bucket) -> str:
    """Production's databases: this module's DSNs (and omni-migrate's) point at them. List it before
    clean_databases, so that the reset acts on them too."""
    for service in SERVICES:
        variable = f"OMNI_PG_DSN_{service.upper().replace('-', '_')}"
        monkeypatch.setenv(variable, os.environ[f"{variable}_PRODUCTION"])
    return bucket


@pytest.fixture()
def staging(monkeypatch, bucket) -> str:
    return bucket


def backups(bucket: str) -> list[str]:
    return [o["Key"] for o in s3().list_objects_v2(Bucket=bucket).get("Contents", [])]


def backup_of(bucket: str, outcome: RunOutcome, service: str) -> dict:
    """Read one backup a run took: its content, sha256 tag, and when it was written; check the tag is its sha256."""
    key = f"{service}/{safe_key(outcome.run_id)}/{outcome.dag_id}.dump"
    client = s3()
    obj = client.get_object(Bucket=bucket, Key=key)
    body = obj["Body"].read()
    tags = {t["Key"]: t["Value"] for t in client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}
    assert tags["sha256"] == hashlib.sha256(body).hexdigest()
    assert obj.get("ServerSideEncryption")
    return {"key": key, "body": body, "written": obj["LastModified"]}


def dump_listing(body: bytes, tmp_path: Path) -> str:
    """Return ``pg_restore --list`` of a dump: what the database held when it was taken."""
    path = tmp_path / f"{uuid.uuid4().hex}.dump"
    path.write_bytes(body)
    return subprocess.run([str(Path(os.environ["OMNI_PG_BIN_DIR"]) / "pg_restore"), "--list", str(path)],
                          capture_output=True, text=True, check=True).stdout


def holder_of(service: str) -> str | None:
    holder = ServiceLock(service, lambda: psycopg2.connect(dsn(service))).holder()
    return holder.run_id if holder else None


def iso(seconds_from_now: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)).isoformat(timespec="seconds")


APPLY = {"dry_run": False, "reason": "e2e: guards"}
FORCED = {"window": "now", "force_reason": "e2e: no window in a test"}


# ---- unknown conf keys -----------------------------------------------------------------------------------------------

def test_schema_migrations_refuses_an_unknown_conf_key_naming_the_closest(production, clean_databases, capfd):
    outcome = run_dag("schema_migrations", {**PRODUCTION, "service": "auth-service", "dryRun": False,
                                            "reason": "e2e: typo"})
    assert outcome.state == "failed" and outcome.task("check_params") == "failed", outcome.tasks
    assert outcome.task("services_of_wave_1") == "upstream_failed"
    assert "unknown param(s) in the run's conf: 'dryRun' (did you mean 'dry_run'?)" in capfd.readouterr().out
    assert versions() == [0, 0, 0] and backups(production) == []


def test_data_migrations_refuses_an_unknown_conf_key_naming_the_closest(production, clean_databases, capfd):
    invoices = prepare_invoices()
    outcome = run_dag("data_migrations", {**PRODUCTION, "migration": DATA_MIGRATION, "action": "run",
                                          "reasn": "e2e: typo"})
    assert outcome.state == "failed" and outcome.task("data_migrate") == "failed", outcome.tasks
    assert "'reasn' (did you mean 'reason'?)" in capfd.readouterr().out
    assert undated(invoices) == INVOICES and backups(production) == [] and checkpoint() is None


# ---- schema_migrations -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("conf", "message"), [
    ({"window": "now"}, "param window=now needs param force_reason"),
    ({**FORCED, "no_bucket": True}, "the Airflow Variable omni_backup_bucket_production (the backup bucket of "
                                     "production) is not set"),
    ({"reason": ""}, "param 'reason' is required when dry_run is false"),
], ids=["window-now-without-force-reason", "no-backup-bucket", "no-reason"])
def test_production_refuses_a_change_without_its_guards_and_changes_nothing(production, clean_databases, monkeypatch,
                                                                            capfd, conf, message):
    if conf.pop("no_bucket", False):
        monkeypatch.delenv("AIRFLOW_VAR_OMNI_BACKUP_BUCKET_PRODUCTION")
    outcome = run_dag("schema_migrations", {**PRODUCTION, "service": "all", **APPLY, **conf})
    assert outcome.state == "failed" and outcome.task("check_params") == "failed", outcome.tasks
    assert outcome.task("services_of_wave_1") == "upstream_failed"
    assert message in capfd.readouterr().out
    assert versions() == [0, 0, 0] and backups(production) == []


def test_production_backs_up_before_the_first_migration(production, clean_databases, tmp_path):
    outcome = run_dag("schema_migrations", {**PRODUCTION, "service": "auth-service", **APPLY, **FORCED})
    assert outcome.state == "success", outcome.tasks
    assert versions() == [4, 0, 0]
    backup = backup_of(production, outcome, "auth-service")
    assert backups(production) == [backup["key"]]
    assert backup["written"] <= first_applied_at("auth-service")
    listing = dump_listing(backup["body"], tmp_path)  # the database as it was: no table of migration 001 yet
    assert "omnisphere_schema_history" in listing and " TABLE public users " not in listing
    assert holder_of("auth-service") == outcome.run_id  # held for the run, backup included


def test_production_all_waits_for_each_window_then_backs_up_and_migrates_wave_by_wave(production, clean_databases,
                                                                                     tmp_path):
    # A start outside the services' windows, so with a force_reason: the first wave waits for it, deferred; the
    # later waves go on from it when the wave before them is done.
    opens = iso(20)
    started = time.monotonic()
    outcome = run_dag("schema_migrations", {**PRODUCTION, "service": "all", **APPLY, "window": opens,
                                            "force_reason": "e2e: a joint downtime"})
    assert outcome.state == "success", outcome.tasks
    assert time.monotonic() - started >= 20  # waited, deferred, for the window
    assert versions() == [LATEST[s] for s in SERVICES]
    taken = {service: backup_of(production, outcome, service) for service in SERVICES}
    assert len(backups(production)) == 3
    window_start = datetime.fromisoformat(opens)
    for service, backup in taken.items():
        assert window_start - timedelta(seconds=1) <= backup["written"] <= first_applied_at(service)
    # Wave order: billing depends on auth, notifications on both; each backup precedes its own service's change
    # and follows the change of the service it depends on.
    assert first_applied_at("auth-service") <= taken[BILLING]["written"] + timedelta(seconds=1)
    assert " TABLE public invoices " not in dump_listing(taken[BILLING]["body"], tmp_path)


def test_production_dry_run_needs_no_reason_window_or_backup(production, clean_databases):
    # window=next: a change would wait for Sunday
    outcome = run_dag("schema_migrations", {**PRODUCTION, "service": "all"})
    assert outcome.state == "success", outcome.tasks
    assert versions() == [0, 0, 0] and backups(production) == []


def test_production_with_nothing_to_change_waits_for_no_window(production, clean_databases):
    migrate_cli("auth-service", "up")
    outcome = run_dag("schema_migrations", {**PRODUCTION, "service": "auth-service", **APPLY})  # window=next
    assert outcome.state == "success", outcome.tasks
    assert versions() == [4, 0, 0] and backups(production) == []


def test_staging_changes_at_once_without_window_or_backup(staging, clean_databases):
    outcome = run_dag("schema_migrations", {**STAGING, "service": "all", **APPLY})  # window=next is for production
    assert outcome.state == "success", outcome.tasks
    assert versions() == [LATEST[s] for s in SERVICES] and backups(staging) == []


# ---- data_migrations -------------------------------------------------------------------------------------------------

def prepare_invoices() -> list[int]:
    """billing-service at its latest schema, invoices without a due date, and the data migration never run."""
    migrate_cli(BILLING, "up")
    with psycopg2.connect(dsn(BILLING)) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('omnisphere_data_migrations') IS NOT NULL")
        if cur.fetchone()[0]:
            cur.execute("DELETE FROM omnisphere_data_migrations WHERE name = 'backfill_invoice_due_dates'")
        cur.execute("INSERT INTO customers (auth_user_id) VALUES (%s) RETURNING id", [uuid.uuid4().int % 10**9])
        customer = cur.fetchone()[0]
        cur.execute("INSERT INTO invoices (customer_id, amount_cents) SELECT %s, n FROM generate_series(1, %s) n "
                    "RETURNING id", [customer, INVOICES])
        return [row[0] for row in cur.fetchall()]


def undated(invoices: list[int]) -> int:
    return query(BILLING, "SELECT count(*) FROM invoices WHERE due_at IS NULL AND id = ANY(%s)", (invoices,))[0][0]


def checkpoint() -> tuple | None:
    if not query(BILLING, "SELECT to_regclass('omnisphere_data_migrations') IS NOT NULL")[0][0]:
        return None
    rows = query(BILLING, "SELECT state, started_at, run_by FROM omnisphere_data_migrations "
                          "WHERE name = 'backfill_invoice_due_dates' AND direction = 'forward'")
    return rows[0] if rows else None


@pytest.mark.parametrize(("conf", "message"), [
    ({"window": "now", "force_reason": "e2e"}, "param 'reason' is required in production to change billing-service"),
    ({"reason": "e2e: guards", "window": "now"}, "param window=now needs param force_reason"),
], ids=["no-reason", "window-now-without-force-reason"])
def test_production_refuses_a_data_migration_without_its_guards_and_changes_nothing(production, clean_databases,
                                                                                    capfd, conf, message):
    invoices = prepare_invoices()
    outcome = run_dag("data_migrations", {**PRODUCTION, "migration": DATA_MIGRATION, "action": "run", **conf})
    assert outcome.state == "failed" and outcome.task("data_migrate") == "failed", outcome.tasks
    assert message in capfd.readouterr().out
    assert undated(invoices) == INVOICES and checkpoint() is None and backups(production) == []


def test_production_data_migration_backs_up_before_the_first_batch(production, clean_databases):
    invoices = prepare_invoices()
    outcome = run_dag("data_migrations", {**PRODUCTION, "migration": DATA_MIGRATION, "action": "run",
                                          "reason": "OPS-7: backfill",
                                          **FORCED})
    assert outcome.state == "success", outcome.tasks
    assert undated(invoices) == 0
    state, started_at, run_by = checkpoint()
    assert state == "done" and "OPS-7: backfill" in run_by
    backup = backup_of(production, outcome, BILLING)
    assert backups(production) == [backup["key"]] and backup["written"] <= started_at
    assert outcome.outputs["data_migrate"]["backup"]["uri"].endswith(backup["key"])
    assert holder_of(BILLING) == outcome.run_id


def test_production_pause_is_a_request_that_needs_no_guard(production, clean_databases):
    prepare_invoices()
    outcome = run_dag("data_migrations", {**PRODUCTION, "migration": DATA_MIGRATION, "action": "pause"})
    assert outcome.state == "success", outcome.tasks
    assert backups(production) == []


def test_staging_data_migration_needs_no_reason_window_or_backup(staging, clean_databases):
    invoices = prepare_invoices()
    outcome = run_dag("data_migrations", {**STAGING, "migration": DATA_MIGRATION, "action": "run"})
    assert outcome.state == "success", outcome.tasks
    assert undated(invoices) == 0 and backups(staging) == []
