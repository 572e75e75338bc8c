"""The verification checks of issue #17 end to end on the devstack: the bake's log check, the smoke test's /version
rule, and the bake record (XCom ``bake``) the monitoring gate leaves whatever its outcome.

Each check fails a release that then rolls back completely (the run FAILED, every task as the rollback leaves it, the
service on its previous task definition, the schema as before), and lets a good release through.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest

from tests.e2e.test_release_dag import SERVICE, assert_rolled_back, release, release_env, snapshot

pytestmark = pytest.mark.e2e
__all__ = ["release_env"]  # the fixture, imported for this module's tests

# What a rollback after a failure at smoke_test or monitoring_gate leaves: the main stages before it passed.
PASSED_BEFORE_SMOKE = ("wait_for_window", "preflight", "backup", "schema_up", "integrity_check", "ecs_deploy")
ROLLBACK = {"rollback_ecs": "success", "rollback_schema": "success", "restore_backup": "skipped",
            "verify_rollback": "success", "release_failed": "failed", "report": "success"}


def bake_of(outcome: Any) -> dict[str, Any] | None:
    """Return the bake record the monitoring gate pushed (XCom key ``bake``), as the report task would pull it."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=outcome.run_id, dag_ids=outcome.dag_id, key="bake",
                                                  task_ids="monitoring_gate")).all()
        return XComModel.deserialize_value(rows[0]) if rows else None


def assert_task_states(outcome: Any, failed_stage: str) -> None:
    for task in PASSED_BEFORE_SMOKE:
        assert outcome.task(task) == "success", (task, outcome.tasks)
    assert outcome.task(failed_stage) == "failed", outcome.tasks
    if failed_stage == "smoke_test":
        assert outcome.task("monitoring_gate") == "upstream_failed", outcome.tasks
    assert outcome.task("finalize") == "upstream_failed", outcome.tasks
    for task, state in ROLLBACK.items():
        assert outcome.task(task) == state, (task, outcome.tasks)


def assert_bake_shape(bake: dict[str, Any], traffic_seen: bool = True) -> None:
    """The record the Releases page charts (issue #18): exactly these keys, a reading for every minute; with
    ``traffic_seen``, some of the sample service's requests among them."""
    from omnisphere_release.ui.bake import check_bake

    check_bake(bake)
    assert set(bake) == {"started_at", "ended_at", "thresholds", "readings", "failed_at", "verdict", "reason",
                         "steps", "log_errors"}
    assert bake["thresholds"] == {"max_error_rate": 0.02, "max_p99_latency_ms": 800, "missing_data_minutes": 1.0}
    assert bake["readings"], bake
    for reading in bake["readings"]:
        assert set(reading) == {"minute", "error_rate", "p99_ms", "requests"}
        assert reading["minute"].endswith(":00+00:00")
    if traffic_seen:
        assert any(r["requests"] for r in bake["readings"]), bake["readings"]


def test_log_errors_fail_the_bake_and_the_release_rolls_back(release_env, capfd):
    before = release_env["before"]
    outcome = release("-logerrors")  # answers 200 everywhere, and logs ERROR lines

    assert_rolled_back(outcome, before, "monitoring_gate")
    assert_task_states(outcome, "monitoring_gate")
    bake = bake_of(outcome)
    assert bake is not None
    # The error lines logged during smoke_test and regression_test fail the bake at its first reading, which may come
    # before the load balancer's first datapoint of the bake (the devstack publishes every 2 s): CI saw 0 requests.
    assert_bake_shape(bake, traffic_seen=False)
    assert bake["verdict"] == "failed" and bake["failed_at"] == bake["ended_at"]
    assert " error log line(s) in 2 stream(s) of the new task set (/ecs/auth-service, streams sha256-" in bake["reason"]
    assert "more than the 0 allowed (monitoring.logs.max_error_lines)" in bake["reason"]
    assert bake["log_errors"]["count"] > 0
    assert 1 <= len(bake["log_errors"]["samples"]) <= 5
    assert all(len(line) <= 300 and "\n" not in line for line in bake["log_errors"]["samples"])
    assert any(line.startswith("ERROR payments client") for line in bake["log_errors"]["samples"])
    # The 5xx rate stayed below the threshold: it is the log check that failed the release.
    assert all((r["error_rate"] or 0) <= 0.02 for r in bake["readings"]), bake["readings"]
    log = "".join(capfd.readouterr())
    assert "error log line(s) of the new task set:" in log
    assert "ERROR payments client: call" in log  # the gate's log quotes the lines


class OldTaskSetLogging:
    """Write ERROR lines into a stream of the image the service runs before the release, every half second, while
    the release runs: the old task set's errors must not count against the new one."""

    def __init__(self) -> None:
        import os

        import boto3

        from omnisphere_release.catalog import load_catalog
        from omnisphere_release.hooks.cloudwatch import log_stream_prefix

        service = load_catalog().get(SERVICE)
        assert service.monitoring.logs is not None
        self.group = service.monitoring.logs.log_group
        self.stream = log_stream_prefix(before_image(), service.ecs.container) + "0" * 32
        self.logs = boto3.client("logs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        self.written = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        with contextlib.suppress(self.logs.exceptions.ResourceAlreadyExistsException):
            self.logs.create_log_stream(logGroupName=self.group, logStreamName=self.stream)
        while not self.stop.wait(0.5):
            self.logs.put_log_events(logGroupName=self.group, logStreamName=self.stream, logEvents=[
                {"timestamp": int(time.time() * 1000), "message": "ERROR from a task of the previous image"}])
            self.written += 1

    def __enter__(self) -> OldTaskSetLogging:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def test_a_clean_release_passes_the_log_check_and_the_version_check_and_records_its_bake(release_env, capfd):
    with OldTaskSetLogging() as old_task_set:
        outcome = release()
    assert old_task_set.written > 10  # the old task set logged errors all along

    assert outcome.state == "success", outcome.tasks
    for stage in (*PASSED_BEFORE_SMOKE, "smoke_test", "monitoring_gate", "finalize", "report"):
        assert outcome.task(stage) == "success", (stage, outcome.tasks)
    assert outcome.task("rollback_ecs") == "skipped" and outcome.task("release_failed") == "skipped"
    assert snapshot()["task_definition"] != release_env["before"]["task_definition"]
    version_round = [e for e in outcome.outputs["smoke_test"]["endpoints"] if e.startswith("GET /version x10")]
    assert version_round and version_round[0].endswith(", ok"), outcome.outputs["smoke_test"]
    bake = bake_of(outcome)
    assert bake is not None
    assert_bake_shape(bake)
    assert bake["verdict"] == "passed" and bake["failed_at"] is None and bake["reason"] is None
    assert bake["log_errors"] == {"count": 0, "samples": []}
    log = "".join(capfd.readouterr())
    assert "0 error log line(s) in 2 stream(s)" in log  # the new task set's streams were found and read


def test_an_old_task_still_serving_after_the_switch_fails_the_smoke_test_and_rolls_back(release_env, capfd):
    before = release_env["before"]
    old_image = before_image()
    outcome = release("-stale")  # a task of the previous image stays behind the load balancer

    assert_rolled_back(outcome, before, "smoke_test")
    assert_task_states(outcome, "smoke_test")
    assert bake_of(outcome) is None  # no bake: the gate never ran
    log = "".join(capfd.readouterr())
    assert "GET /version x10 -> 200" in log
    assert f"answered {old_image} (" in log  # the failure names what answered


def before_image() -> str:
    import os

    import boto3

    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    service = ecs.describe_services(cluster="omnisphere", services=[SERVICE])["services"][0]
    [container] = ecs.describe_task_definition(taskDefinition=service["taskDefinition"])["taskDefinition"][
        "containerDefinitions"]
    return container["image"]


def test_a_bake_failed_by_its_5xx_rate_is_recorded_with_the_minute_that_breached(release_env):
    outcome = release("-errors")  # a quarter of the application traffic answered 5xx

    assert_rolled_back(outcome, release_env["before"], "monitoring_gate")
    assert_task_states(outcome, "monitoring_gate")
    bake = bake_of(outcome)
    assert bake is not None
    assert_bake_shape(bake)
    assert bake["verdict"] == "failed" and bake["reason"].startswith("5xx error rate ")
    assert bake["failed_at"] == bake["ended_at"]
    assert max(r["error_rate"] or 0 for r in bake["readings"]) > bake["thresholds"]["max_error_rate"]
    assert bake["log_errors"] == {"count": 0, "samples": []}  # a -errors image logs no error: the metrics caught it
