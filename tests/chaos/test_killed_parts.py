"""Parts of the Celery topology SIGKILLed in the middle of a release, as a node dies at 3 a.m.: the worker that runs
backup, the triggerer while ecs_deploy is deferred, the scheduler, the worker that runs rollback_schema. The supervisor
brings each back; each release ends as it would have without the fault, and the service (ECS image, schema version,
data) is exactly what that outcome promises."""

from __future__ import annotations

import time
from typing import Any

import psutil
import pytest

from tests.chaos.conftest import SLOW_ROLLBACK_FLAG, Chaos
from tests.chaos.helpers import (
    BASE_VERSION,
    SERVICE,
    STAGES,
    Release,
    assert_released,
    aws,
    deployments_to,
    run_sql,
    scale_service,
    service_state,
    wait_for_pg_sleep,
    worker_of,
)

pytestmark = pytest.mark.chaos
RESTART_SECONDS = 60


def wait_for_process(text: str, timeout: float = 60) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            if text in " ".join(process.info["cmdline"] or []):
                return process
        time.sleep(0.1)
    raise AssertionError(f"no process running {text!r} within {timeout:.0f}s")


def test_a_worker_killed_during_backup_is_retried_and_the_release_keeps_one_verified_backup(fresh: Chaos):
    from omnisphere_release.operators.common import safe_key

    before = service_state(SERVICE)
    fresh.slow_pg_dump.touch()
    release = Release(fresh.topo, fresh.client, SERVICE).trigger()
    ti = release.wait_running("backup")
    wait_for_process(str(fresh.home / "pg-bin" / "pg_dump"))  # in the middle of the dump
    worker = worker_of(fresh.topo, ti)
    killed = fresh.topo.kill(worker)
    fresh.slow_pg_dump.unlink()
    print(f"killed {worker} (pid {killed}) while it ran backup (task pid {ti['pid']})")
    fresh.topo.wait_restarted(worker, killed, timeout=RESTART_SECONDS)

    assert release.wait_until_end(timeout=300) == "success", release.explain("backup")
    tis = release.tis()
    assert tis["backup"]["try_number"] == 2, release.explain("backup")  # the killed try, then the one that passed
    assert_released(release, before)
    backup = release.xcom("report")["backup"]
    assert backup["sha256"] and backup["objects"] > 0 and backup["size_bytes"] > 0, backup
    s3 = aws("s3")
    prefix = f"{SERVICE}/{safe_key(release.run_id)}/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=backup["bucket"], Prefix=prefix).get("Contents", [])]
    dumps = [key for key in keys if key.endswith(".dump")]
    assert dumps == [backup["key"]], f"backups of the run under s3://{backup['bucket']}/{prefix}: {keys}"
    tags = s3.get_object_tagging(Bucket=backup["bucket"], Key=backup["key"])["TagSet"]
    assert {"Key": "sha256", "Value": backup["sha256"]} in tags, tags


def test_a_triggerer_killed_while_ecs_deploy_is_deferred_hands_the_same_wait_to_its_successor(fresh: Chaos):
    """The trigger row survives its triggerer: the restarted one takes over the same trigger, with the same absolute
    deadline, and the task resumes once without a retry (so without a second deployment)."""
    before = service_state(SERVICE)
    # 40 tasks roll out one step per 0.3 s: about 24 s of deployment, time for the triggerer to die and come back.
    scale_service(SERVICE, 40)
    try:
        release = Release(fresh.topo, fresh.client, SERVICE).trigger()
        release.wait_for_task("ecs_deploy", lambda ti: ti["state"] == "deferred", "deferred", timeout=180)
        first = wait_for_trigger(fresh, release, lambda t: t["triggerer_id"] is not None, "taken by the triggerer")
        killed = fresh.topo.kill("triggerer")
        print(f"killed the triggerer (pid {killed}, job {first['triggerer_id']}) running trigger {first['id']} "
              f"with deadline {first['kwargs']['deadline']}")
        fresh.topo.wait_restarted("triggerer", killed, timeout=RESTART_SECONDS)
        second = wait_for_trigger(fresh, release, lambda t: t["triggerer_id"] not in (None, first["triggerer_id"]),
                                  "taken over by the restarted triggerer")
        print(f"trigger {second['id']} taken over by triggerer job {second['triggerer_id']}, deadline "
              f"{second['kwargs']['deadline']}")
        assert second["id"] == first["id"], "the restarted triggerer runs a new trigger, not the deferred one"
        assert second["kwargs"] == first["kwargs"], "the wait changed across the triggerer's restart"
        assert release.wait_until_end(timeout=300) == "success", release.explain("ecs_deploy")
    finally:
        scale_service(SERVICE, 2)
    assert release.tis()["ecs_deploy"]["try_number"] == 1, release.explain("ecs_deploy")
    after = assert_released(release, before)
    assert len(deployments_to(SERVICE, after.task_definition)) == 1, deployments_to(SERVICE, after.task_definition)


def wait_for_trigger(chaos: Chaos, release: Release, until: Any, what: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = chaos.trigger_of(release.dag_id, release.run_id, "ecs_deploy")
        if seen is not None and until(seen):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"the trigger of ecs_deploy was not {what} within {timeout:.0f}s (last seen: {seen})\n"
                         + release.explain("ecs_deploy"))


def test_a_scheduler_killed_mid_release_comes_back_and_the_run_completes(fresh: Chaos):
    """Killed while backup runs on a worker: the restarted scheduler takes the run over, the running task finishes
    where it runs and is not run a second time, and the rest of the release is scheduled by the new scheduler."""
    before = service_state(SERVICE)
    fresh.slow_pg_dump.touch()
    release = Release(fresh.topo, fresh.client, SERVICE).trigger()
    release.wait_running("backup")
    wait_for_process(str(fresh.home / "pg-bin" / "pg_dump"))
    killed = fresh.topo.kill("scheduler")
    fresh.slow_pg_dump.unlink()
    print(f"killed the scheduler (pid {killed}) while backup ran")
    fresh.topo.wait_restarted("scheduler", killed, timeout=RESTART_SECONDS)
    assert release.wait_until_end(timeout=300) == "success", release.explain()
    assert fresh.topo.restarts("scheduler") >= 1
    tries = {task: ti["try_number"] for task, ti in release.tis().items() if task in STAGES}
    assert tries == dict.fromkeys(STAGES, 1), f"tasks run more than once: {tries}\n{release.explain('backup')}"
    assert_released(release, before)


def test_a_worker_killed_during_rollback_schema_finishes_on_retry_and_everything_is_as_before(fresh: Chaos):
    """A release whose tasks crash in ECS rolls back; the worker reverting the schema dies in the middle of version
    5's down file (a transaction, so nothing of it stays). The retry reverts 5 and 4, and the run is FAILED with the
    service exactly as before: revision, image, schema version, tables and rows."""
    before = service_state(SERVICE)
    run_sql(SERVICE, f"CREATE SCHEMA {SLOW_ROLLBACK_FLAG}")  # a test constant, not input
    try:
        release = Release(fresh.topo, fresh.client, SERVICE).trigger("-crashloop")
        ti = release.wait_running("rollback_schema", timeout=240)
        wait_for_pg_sleep(SERVICE)
        worker = worker_of(fresh.topo, ti)
        killed = fresh.topo.kill(worker)
        print(f"killed {worker} (pid {killed}) while rollback_schema reverted version 5")
    finally:
        run_sql(SERVICE, f"DROP SCHEMA IF EXISTS {SLOW_ROLLBACK_FLAG}")
    fresh.topo.wait_restarted(worker, killed, timeout=RESTART_SECONDS)
    assert release.wait_until_end(timeout=300) == "failed", release.explain("rollback_schema")
    states, explain = release.states(), release.explain("rollback_schema")
    assert states["ecs_deploy"] == "failed", explain
    assert states["rollback_ecs"] == "success" and states["verify_rollback"] == "success", explain
    assert states["rollback_schema"] == "success", explain
    assert release.tis()["rollback_schema"]["try_number"] == 2, explain
    assert states["restore_backup"] == "skipped", explain  # the down files did it all: no restore needed
    assert states["release_failed"] == "failed", explain
    after = service_state(SERVICE)
    assert (after.task_definition, after.image, after.schema_version) == (
        before.task_definition, before.image, BASE_VERSION), explain
    assert after.tables == before.tables, "the tables (columns, rows) are not as before the release"
    report = release.xcom("report")
    assert report["outcome"] == "rolled_back", report["summary"]
    assert report["rollback"]["rollback_schema"]["result"]["reverted"] == [5, 4], report["rollback"]
