"""regression_test end to end on the devstack: the suite runs as a one-off ECS task against the released image.

A release whose image tag ends ``-regressions`` makes the devstack's suite fail (devstack/ecs_tasks.py): the stage
fails, the release rolls back completely and the run is FAILED; any other tag passes. Either way the suite's own lines,
read from CloudWatch Logs, are in the task's log.
"""

from __future__ import annotations

import os
import re

import boto3
import pytest
import yaml

from devstack.aws import IMAGE_REPOSITORY
from tests.e2e.helpers import REPO
from tests.e2e.test_release_dag import SERVICE, assert_rolled_back, release, release_env, snapshot

pytestmark = pytest.mark.e2e
__all__ = ["release_env"]  # the fixture, shared with the release DAG's tests


def suite_runs(cluster: str = "omnisphere") -> list[dict]:
    """Return the suite tasks of auth-service that ECS has run on ``cluster``, newest last."""
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    arns = ecs.list_tasks(cluster=cluster, family="auth-service-regression", desiredStatus="STOPPED")["taskArns"]
    tasks = ecs.describe_tasks(cluster=cluster, tasks=arns)["tasks"] if arns else []
    return sorted(tasks, key=lambda t: t["createdAt"])


def test_a_release_whose_suite_finds_regressions_fails_at_regression_test_and_rolls_back(release_env, capfd):
    runs_before = len(suite_runs())
    outcome = release("-regressions")
    assert outcome.task("smoke_test") == "success", outcome.tasks
    assert_rolled_back(outcome, release_env["before"], "regression_test")
    assert outcome.task("monitoring_gate") == "upstream_failed"
    assert outcome.task("finalize") == "upstream_failed"
    runs = suite_runs()
    assert len(runs) == runs_before + 1  # one suite, not retried: its verdict would not change
    [container] = runs[-1]["containers"]
    assert container["exitCode"] == 1
    log = capfd.readouterr().out
    # The suite's own lines, forwarded from its log stream, and the failure quoting them.
    assert "FAILED test_sign_in_round_trip - AssertionError: expected 200, got 500" in log
    assert "Regression suite of auth-service failed: exit code 1" in log
    assert "2 failed, 2 passed" in log


def test_a_release_whose_suite_passes_goes_on_to_the_monitoring_gate(release_env, capfd):
    outcome = release()
    assert outcome.state == "success", outcome.tasks
    assert outcome.task("regression_test") == "success"
    assert outcome.task("monitoring_gate") == "success"
    assert snapshot()["task_definition"] != release_env["before"]["task_definition"]
    result = outcome.outputs["regression_test"]
    plan = outcome.outputs["preflight"]
    # The suite tested the released image, by the digest preflight checked.
    assert result["image"] == f"{IMAGE_REPOSITORY}/{SERVICE}@{plan['target_image_digest']}"
    assert result["exit_code"] == 0 and result["summary"] == "4 passed"
    [task] = [t for t in suite_runs() if t["taskArn"] == result["task_arn"]]
    overrides = {e["name"]: e["value"] for e in task["overrides"]["containerOverrides"][0]["environment"]}
    assert overrides["OMNI_RELEASE_IMAGE_TAG"] == plan["image_tag"]
    assert overrides["OMNI_SERVICE_URL"] == os.environ["OMNI_SAMPLE_URL_AUTH_SERVICE"]
    log = capfd.readouterr().out
    assert "PASSED test_sign_in_round_trip" in log
    assert f"GET {os.environ['OMNI_SAMPLE_URL_AUTH_SERVICE']}/version -> 200" in log
    assert "Regression suite of auth-service passed (exit code 0)" in log


def catalog_with(tmp_path, monkeypatch, **regression) -> None:
    """Point OMNISPHERE_CATALOG at a copy of the catalog whose auth-service has ``regression`` (none: no suite)."""
    catalog = yaml.safe_load((REPO / "include" / "services.yaml").read_text())
    auth = next(s for s in catalog["services"] if s["name"] == SERVICE)
    auth.pop("regression")
    if regression:
        auth["regression"] = regression
    path = tmp_path / "services.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    monkeypatch.setenv("OMNISPHERE_CATALOG", str(path))


class PlanOnly:
    """The task instance of a run whose preflight recorded ``plan``."""

    dag_id, task_id, run_id, map_index = f"release_{SERVICE}", "regression_test", "manual__test", -1

    def __init__(self, plan: dict) -> None:
        self.plan = plan

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> dict | None:
        return self.plan if task_ids == "preflight" else None


def test_a_service_without_a_suite_passes_the_stage_saying_so(tmp_path, monkeypatch, capfd):
    from omnisphere_release.operators.regression import EcsRegressionTestOperator

    catalog_with(tmp_path, monkeypatch)
    operator = EcsRegressionTestOperator(task_id="regression_test", service=SERVICE)
    assert operator.execute({"ti": PlanOnly({})}) == {"suite": None}  # no AWS call: nothing to run
    assert f"{SERVICE} has no regression suite configured (catalog field regression): nothing to run" in capfd.readouterr().out


@pytest.mark.parametrize(("regression", "message"), [
    ({"task_definition": "auth-service-regresion", "container": "regression"},
     "fix the catalog field regression.task_definition of auth-service"),
    ({"task_definition": "auth-service-regression", "container": "tests"},
     "has no container 'tests' (it has ['regression']); fix the catalog field regression.container of auth-service"),
], ids=["unknown task definition", "unknown container"])
def test_a_suite_the_catalog_misnames_fails_the_stage_naming_the_field_and_runs_nothing(
        devstack, tmp_path, monkeypatch, regression, message):
    from airflow.sdk.exceptions import AirflowFailException

    from omnisphere_release.operators.regression import EcsRegressionTestOperator

    catalog_with(tmp_path, monkeypatch, **regression)
    runs_before = len(suite_runs())
    plan = {"target_image": f"{IMAGE_REPOSITORY}/{SERVICE}:1.2.0", "target_image_digest": None,
            "image_tag": "1.2.0", "environment": "staging"}
    operator = EcsRegressionTestOperator(task_id="regression_test", service=SERVICE)
    with pytest.raises(AirflowFailException, match=re.escape(message)):
        operator.execute({"ti": PlanOnly(plan)})
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    assert len(suite_runs()) == runs_before
    assert ecs.list_tasks(cluster="omnisphere", family="auth-service-regression",
                          desiredStatus="RUNNING")["taskArns"] == []
