"""Faults of the systems a release talks to, on the Celery topology: AWS that throttles, answers 503 and drops
connections for a whole release; AWS unreachable during the bake, shorter and longer than the catalog's
missing_data_minutes; the service's PostgreSQL restarted while the integrity checks run. A transient fault is
waited out or retried, never a rollback; a fault that outlasts what the catalog tolerates is a rollback that says why.

Note: the devstack's PostgreSQL also holds the topology's Airflow metadata, so its restart is felt by every part of
Airflow too (in production they are separate servers): the release must survive that as well.
"""

from __future__ import annotations

import time

import pytest

from devstack import faults
from devstack.aws import IMAGE_REPOSITORY
from tests.chaos.conftest import Chaos
from tests.chaos.helpers import (
    ROLLBACK,
    SERVICE,
    Release,
    assert_released,
    reset_service,
    service_state,
    wait_for_pg_sleep,
)

pytestmark = pytest.mark.chaos


def test_a_release_through_20_percent_aws_faults_succeeds_without_a_rollback(fresh: Chaos):
    before = service_state(SERVICE)
    log_lines = len(devstack_log(fresh))
    release = Release(fresh.topo, fresh.client, SERVICE).trigger(
        before_run=lambda: faults.set_aws_faults(fresh.state_dir, rate=0.2))  # once the image is pushed
    injected_from = time.monotonic()
    try:
        state = release.wait_until_end(timeout=400)
    finally:
        faults.clear_aws_faults(fresh.state_dir)
    injected = sum("fault injected:" in line for line in devstack_log(fresh)[log_lines:])
    print(f"20 % AWS faults for {time.monotonic() - injected_from:.0f}s: {injected} answers failed; tries: "
          f"{ {t: ti['try_number'] for t, ti in release.tis().items()} }")
    assert state == "success", release.explain()
    states = release.states()
    assert {task: states[task] for task in ROLLBACK} == dict.fromkeys(ROLLBACK, "skipped"), release.explain()
    assert injected > 0, "no fault was injected: the test proved nothing"
    assert_released(release, before)


def devstack_log(chaos: Chaos) -> list[str]:
    return (chaos.state_dir / "devstack.log").read_text(errors="replace").splitlines()


def test_a_20s_aws_outage_during_the_bake_is_waited_out(fresh: Chaos):
    before = service_state(SERVICE)
    release = Release(fresh.topo, fresh.client, SERVICE).trigger(bake_minutes=0.35)
    release.wait_for_task("monitoring_gate", lambda ti: ti["state"] == "deferred", "deferred (baking)")
    time.sleep(2)  # the triggerer has the bake and read CloudWatch once
    faults.set_aws_faults(fresh.state_dir, outage_seconds=20)
    print("AWS unreachable for 20 s from now, during the bake")
    assert release.wait_until_end(timeout=300) == "success", release.explain("monitoring_gate")
    log = release.task_log("monitoring_gate")
    assert "cannot read CloudWatch" in log, log[-3000:]
    assert "CloudWatch readable again after" in log, log[-3000:]
    assert_released(release, before)


def test_an_aws_outage_longer_than_missing_data_minutes_rolls_back_saying_so(fresh: Chaos):
    """notification-service's catalog (the chaos one) tolerates 15 s without CloudWatch: an outage that lasts longer
    fails the gate, and the release rolls back; the outage ends meanwhile, as outages do."""
    service = "notification-service"
    reset_service(service, 3, fresh.migrate)
    before = service_state(service)
    release = Release(fresh.topo, fresh.client, service).trigger(bake_minutes=0.25)
    release.wait_for_task("monitoring_gate", lambda ti: ti["state"] == "deferred", "deferred (baking)")
    time.sleep(1)
    faults.set_aws_faults(fresh.state_dir, outage_seconds=120)
    try:
        release.wait_for_task("monitoring_gate", lambda ti: ti["state"] == "failed", "failed", timeout=120)
    finally:
        faults.clear_aws_faults(fresh.state_dir)  # the outage ends; the way back goes on
    assert release.wait_until_end(timeout=300) == "failed", release.explain("monitoring_gate", "rollback_ecs")
    states, explain = release.states(), release.explain("monitoring_gate", "rollback_ecs")
    assert states["rollback_ecs"] == "success" and states["verify_rollback"] == "success", explain
    assert states["release_failed"] == "failed", explain
    log = release.task_log("monitoring_gate")
    assert "Monitoring gate failed: CloudWatch could not be read for" in log, log[-3000:]
    assert "monitoring.missing_data_minutes" in log, log[-3000:]
    after = service_state(service)
    assert (after.task_definition, after.image, after.schema_version) == (
        before.task_definition, before.image, before.schema_version), explain
    assert after.image != f"{IMAGE_REPOSITORY}/{service}@{release.digest}"
    assert after.tables == before.tables
    assert release.xcom("report")["outcome"] == "rolled_back"


def test_a_postgres_restart_during_integrity_check_is_retried_and_the_release_succeeds(fresh: Chaos):
    before = service_state(SERVICE)
    # A check that takes 6 s, so that the restart lands in the middle of the checks.
    (fresh.checks / "zz_chaos_slow.sql").write_text("-- chaos test: slow, passes (returns no row)\n"
                                                    "SELECT slept FROM (SELECT pg_sleep(6)::text AS slept) s "
                                                    "WHERE slept = 'never';\n")
    release = Release(fresh.topo, fresh.client, SERVICE).trigger()
    release.wait_running("integrity_check")
    wait_for_pg_sleep(SERVICE)
    seconds = faults.restart_postgres(fresh.state_dir)
    print(f"PostgreSQL restarted during integrity_check ({seconds:.1f}s)")
    assert release.wait_until_end(timeout=300) == "success", release.explain("integrity_check")
    log = release.task_log("integrity_check")
    assert release.tis()["integrity_check"]["try_number"] == 1, release.explain("integrity_check")
    assert "integrity checks of auth-service: lost the connection to the database" in log, log[-3000:]
    assert "the database answered again after" in log, log[-3000:]
    assert_released(release, before)
