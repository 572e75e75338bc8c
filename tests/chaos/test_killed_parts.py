"""Parts of the Celery topology SIGKILLed in the middle of a release, as a node dies at 3 a.m.: the worker that runs
backup, the triggerer while ecs_deploy is deferred, the scheduler, the worker that runs rollback_schema. The supervisor
brings each back; each release ends as it would have without the fault, and the service (ECS image, schema version,
data) is exactly what that outcome promises."""

from __future__ import annotations

import time

import psutil
import pytest

from devstack.aws import IMAGE_REPOSITORY
from tests.chaos.conftest import SLOW_ROLLBACK_FLAG, Chaos
from tests.chaos.helpers import (
    Release,
    ServiceState,
    aws,
    dsn_of,
    run_sql,
    service_state,
    sleeping_in,
    worker_of,
)

pytestmark = pytest.mark.chaos
SERVICE = "auth-service"
STAGES = ("preflight", "backup", "schema_up", "integrity_check", "ecs_deploy", "smoke_test", "monitoring_gate",
          "finalize")
ROLLBACK = ("rollback_ecs", "rollback_schema", "restore_backup", "verify_rollback")
RESTART_SECONDS = 60


def assert_released(release: Release, before: ServiceState) -> ServiceState:
    """The run is green, every stage ran and no rollback did; the service runs the release's image at version 5
    with every row it had (the checksum of the tables and columns it had before)."""
    states = release.states()
    explain = release.explain()
    assert release.run_state() == "success", explain
    assert {s: states[s] for s in STAGES} == dict.fromkeys(STAGES, "success"), explain
    assert {s: states[s] for s in ROLLBACK} == dict.fromkeys(ROLLBACK, "skipped"), explain
    after = service_state(SERVICE, before.columns())
    assert after.image == f"{IMAGE_REPOSITORY}/{SERVICE}@{release.digest}", explain
    assert after.task_definition != before.task_definition
    assert after.schema_version == 5, explain
    assert after.checksums() == before.checksums(), "rows changed by the release"
    report = release.xcom("report")
    assert report["outcome"] == "released" and report["after"]["task_definition"] == after.task_definition
    return after


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
