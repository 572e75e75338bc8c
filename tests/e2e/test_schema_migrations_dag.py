"""The schema_migrations DAG end to end, with dag.test() against the devstack's PostgreSQL."""

from __future__ import annotations

import os

import psycopg2
import pytest

from tests.e2e.helpers import run_dag

pytestmark = pytest.mark.e2e
SERVICES = ("auth-service", "billing-service", "notification-service")


def version_of(service: str) -> int:
    dsn = os.environ[f"OMNI_PG_DSN_{service.upper().replace('-', '_')}"]
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('omnisphere_schema_history') IS NOT NULL")
        if not cur.fetchone()[0]:
            return 0
        cur.execute("SELECT coalesce(max(version), 0) FROM omnisphere_schema_history WHERE state = 'applied'")
        return cur.fetchone()[0]


@pytest.fixture()
def clean_databases(devstack, airflow_db):
    """Start and end each test with every service database at version 0."""
    from omnisphere_release.migrations.__main__ import main

    def reset():
        for service in SERVICES:
            assert main([service, "down", "--to", "0", "--reason", "test reset"]) == 0

    reset()
    yield
    reset()


def test_default_run_is_a_dry_run_that_changes_nothing(clean_databases):
    outcome = run_dag("schema_migrations", {"service": "auth-service"})
    assert outcome.state == "success"
    assert outcome.task("migrate_wave_1[0]") == "success"
    # Waves with nobody in them are skipped, not failed: the run stays green.
    assert outcome.task("migrate_wave_2") == "skipped" and outcome.task("migrate_wave_3") == "skipped"
    assert version_of("auth-service") == 0


def test_all_up_then_down_follows_dependency_order(clean_databases):
    up = run_dag("schema_migrations", {"service": "all", "dry_run": False, "reason": "e2e: install all"})
    assert up.state == "success", up.tasks
    assert [up.task(f"migrate_wave_{i}[0]") for i in (1, 2, 3)] == ["success"] * 3
    assert [version_of(s) for s in SERVICES] == [4, 4, 3]
    down = run_dag("schema_migrations", {"service": "notification-service", "direction": "down", "target_version": 1,
                                         "dry_run": False, "reason": "e2e: partial revert"})
    assert down.state == "success", down.tasks
    assert version_of("notification-service") == 1 and version_of("auth-service") == 4


def test_apply_without_reason_is_refused_and_changes_nothing(clean_databases):
    outcome = run_dag("schema_migrations", {"service": "all", "dry_run": False})
    assert outcome.state == "failed"
    assert outcome.task("check_params") == "failed"
    assert outcome.task("services_of_wave_1") == "upstream_failed"
    assert [version_of(s) for s in SERVICES] == [0, 0, 0]


def test_failing_migration_fails_its_wave_and_stops_the_next(clean_databases, sql_dir):
    (sql_dir / "billing-service" / "migrations" / "005_bad.up.sql").write_text("ALTER TABLE nope ADD COLUMN x int;")
    (sql_dir / "billing-service" / "migrations" / "005_bad.down.sql").write_text("SELECT 1;")
    outcome = run_dag("schema_migrations", {"service": "all", "dry_run": False, "reason": "e2e: failure"})
    assert outcome.state == "failed"
    assert outcome.task("migrate_wave_1[0]") == "success"
    assert outcome.task("migrate_wave_2[0]") == "failed"
    assert outcome.task("services_of_wave_3") == "upstream_failed"
    assert [version_of(s) for s in SERVICES] == [4, 4, 0]  # billing 001-004 applied, 005 rolled back


def test_invalid_params_are_rejected_before_a_run_exists(airflow_db):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError, match="service"):
        run_dag("schema_migrations", {"service": "payments-service"})
    with pytest.raises(ParamValidationError, match="target_version"):
        run_dag("schema_migrations", {"service": "auth-service", "target_version": "latest"})
