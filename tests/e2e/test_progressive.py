"""Progressive delivery end to end on the devstack (issue #17 item 4): canary and linear in steps, each step analysed
while ECS bakes it, the new task set against the old one; a failing step stopped with ECS's own ROLLBACK.

The steps come from the catalog (a copy with auth-service's deploy.steps); the simulator runs one catalog minute in
OMNI_ECS_SIM_MINUTE_SECONDS real seconds (1 s by default), so a step of 15 "minutes" lasts 15 s here.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
import pytest

from tests.e2e.helpers import catalog_copy
from tests.e2e.test_release_dag import SERVICE, assert_rolled_back, release, release_env, snapshot
from tests.e2e.test_verification import bake_of

# Several whole releases each: in `make test-long` (CI runs it after `make test`), not in `make test`.
pytestmark = [pytest.mark.e2e, pytest.mark.long]
__all__ = ["release_env"]  # the fixture, imported for this module's tests

PASSED_BEFORE_GATE = ("wait_for_window", "preflight", "backup", "schema_up", "integrity_check", "ecs_deploy",
                      "smoke_test")
# Long enough that the gate, which starts after ecs_deploy, smoke_test and regression_test (8 s alone here, over
# 20 s under CI's load), still sees the first step.
FIRST_STEP = 30
# Over before the gate looks: 3 s at 50 % (one or two of the load generator's 2 s rounds, half of whose requests
# reach the new task set: enough for a -errors image to show), then 100 %.
SHORT_STEPS = [{"percent": 50, "bake_minutes": 3}, {"percent": 100, "bake_minutes": 0}]


def with_steps(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, steps: list[dict[str, Any]]) -> None:
    """Point the release at a catalog copy in which auth-service has ``steps``."""
    def edit(catalog: dict[str, Any]) -> None:
        [service] = [s for s in catalog["services"] if s["name"] == SERVICE]
        service["deploy"]["steps"] = steps

    folder = tmp_path / "stepped"
    folder.mkdir()
    monkeypatch.setenv("OMNISPHERE_CATALOG", str(catalog_copy(folder, edit)))


def last_deployment() -> dict[str, Any]:
    """Return auth-service's newest service deployment as DescribeServiceDeployments gives it ({} before any)."""
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    briefs = ecs.list_service_deployments(cluster="omnisphere", service=SERVICE, maxResults=1)["serviceDeployments"]
    if not briefs:
        return {}
    return ecs.describe_service_deployments(serviceDeploymentArns=[briefs[0]["serviceDeploymentArn"]])[
        "serviceDeployments"][0]


def assert_steps(bake: dict[str, Any], percents: list[float], verdicts: list[str]) -> None:
    from omnisphere_release.ui.bake import check_bake, render_chart

    check_bake(bake)  # the Releases page's contract
    assert render_chart(bake, title="steps").lstrip().startswith("<")  # the page can chart it, steps shaded
    assert [s["percent"] for s in bake["steps"]] == percents, bake["steps"]
    assert [s["verdict"] for s in bake["steps"]] == verdicts, bake["steps"]
    for step in bake["steps"]:
        assert set(step) == {"percent", "started_at", "ended_at", "verdict"}
        assert step["started_at"] <= step["ended_at"]


def assert_released(outcome: Any, before: dict[str, Any]) -> None:
    assert outcome.state == "success", outcome.tasks
    for stage in (*PASSED_BEFORE_GATE, "monitoring_gate", "finalize", "report"):
        assert outcome.task(stage) == "success", (stage, outcome.tasks)
    assert outcome.task("rollback_ecs") == "skipped" and outcome.task("release_failed") == "skipped"
    assert snapshot()["task_definition"] != before["task_definition"]
    assert last_deployment()["status"] == "SUCCESSFUL"


def assert_stopped_with_rollback(outcome: Any, before: dict[str, Any]) -> None:
    assert_rolled_back(outcome, before, "monitoring_gate")
    for stage in PASSED_BEFORE_GATE:
        assert outcome.task(stage) == "success", (stage, outcome.tasks)
    assert outcome.task("finalize") == "upstream_failed", outcome.tasks
    deployment = last_deployment()
    # ECS's own ROLLBACK, asked for by the gate (not the circuit breaker, not a redeploy by rollback_ecs).
    assert deployment["status"] == "ROLLBACK_SUCCESSFUL", deployment
    assert deployment["rollback"]["reason"] == "Rollback initiated by user.", deployment


def test_a_clean_canary_passes_its_steps_and_ends_on_the_new_version(release_env, tmp_path, monkeypatch, capfd):
    with_steps(tmp_path, monkeypatch, [{"percent": 10, "bake_minutes": FIRST_STEP},
                                       {"percent": 100, "bake_minutes": 4}])
    outcome = release(strategy="canary")

    assert_released(outcome, release_env["before"])
    config = last_deployment()["deploymentConfiguration"]
    assert config["canaryConfiguration"] == {"canaryPercent": 10.0, "canaryBakeTimeInMinutes": FIRST_STEP}
    assert config["bakeTimeInMinutes"] == 4
    bake = bake_of(outcome)
    assert bake is not None and bake["verdict"] == "passed", bake
    assert_steps(bake, [10.0, 100.0], ["passed", "passed"])
    assert bake["readings"] and any(r["requests"] for r in bake["readings"])
    log = "".join(capfd.readouterr())
    assert "/version is checked by monitoring_gate at 100 %" in log  # smoke_test left it to the gate
    assert "step 10 %: new " in log and "; old " in log  # the two task sets compared
    assert "at 100 % GET /version x10 -> 200" in log and ", ok" in log


def test_a_canary_ecs_completes_before_the_gate_looks_is_baked_at_100_percent_not_rolled_back(
        release_env, tmp_path, monkeypatch, capfd):
    # Short steps: ECS is done before smoke_test and regression_test are (regression_test alone polls its task every
    # 5 s), as the catalog's 2 and 5 minute steps were (2 s and 5 s in the devstack) under a live scheduler, where
    # the gate took it for a failure and a clean canary rolled back.
    with_steps(tmp_path, monkeypatch, SHORT_STEPS)
    outcome = release(strategy="canary")

    assert_released(outcome, release_env["before"])
    bake = bake_of(outcome)
    assert bake is not None and bake["verdict"] == "passed", bake
    # The 50 % step judged after the fact from just before ecs_deploy saw it, then the release's bake at 100 %.
    assert_steps(bake, [50.0, 100.0], ["passed", "passed"])
    assert bake["readings"] and any(r["requests"] for r in bake["readings"])
    log = "".join(capfd.readouterr())
    assert "step(s) before ECS completed, baked by ECS before this gate looked, judged after the fact since " in log
    assert "before this gate saw its last step: step(s) 100 % baked without analysis while ECS baked them" in log
    assert "at 100 % GET /version x10 -> 200" in log and ", ok" in log


def test_a_canary_that_erred_in_steps_ecs_baked_before_the_gate_looked_is_rolled_back(release_env, tmp_path,
                                                                                      monkeypatch):
    # ECS is done before smoke_test and regression_test are: the steps are judged on what CloudWatch kept of them.
    with_steps(tmp_path, monkeypatch, SHORT_STEPS)
    outcome = release("-errors", strategy="canary")

    assert_rolled_back(outcome, release_env["before"], "monitoring_gate")
    bake = bake_of(outcome)
    assert bake is not None and bake["verdict"] == "failed", bake
    assert_steps(bake, [50.0], ["failed"])
    assert bake["reason"].startswith("step 50 % (judged after ECS baked it, from "), bake["reason"]
    assert "new task set's 5xx error rate " in bake["reason"]


def test_a_canary_that_errors_is_stopped_at_its_first_step_with_ecs_rollback(release_env, tmp_path, monkeypatch,
                                                                              capfd):
    with_steps(tmp_path, monkeypatch, [{"percent": 10, "bake_minutes": FIRST_STEP},
                                       {"percent": 100, "bake_minutes": 4}])
    outcome = release("-errors", strategy="canary")  # a quarter of the new task set's answers are 5xx

    assert_stopped_with_rollback(outcome, release_env["before"])
    bake = bake_of(outcome)
    assert bake is not None and bake["verdict"] == "failed", bake
    assert_steps(bake, [10.0], ["failed"])  # it stopped at 10 %: 100 % never came
    assert bake["reason"].startswith("step 10 %: new task set's 5xx error rate "), bake["reason"]
    assert "(old task set: " in bake["reason"]
    log = "".join(capfd.readouterr())
    assert "Stopped the deployment with ECS's ROLLBACK" in log


def test_a_clean_linear_passes_every_step(release_env, tmp_path, monkeypatch):
    with_steps(tmp_path, monkeypatch, [{"percent": 50, "bake_minutes": FIRST_STEP},
                                       {"percent": 100, "bake_minutes": 4}])
    outcome = release(strategy="linear")

    assert_released(outcome, release_env["before"])
    assert last_deployment()["deploymentConfiguration"]["linearConfiguration"] == {
        "stepPercent": 50.0, "stepBakeTimeInMinutes": FIRST_STEP}
    bake = bake_of(outcome)
    assert bake is not None and bake["verdict"] == "passed", bake
    assert_steps(bake, [50.0, 100.0], ["passed", "passed"])


def test_a_linear_that_errors_is_stopped_at_its_first_step_with_ecs_rollback(release_env, tmp_path, monkeypatch):
    with_steps(tmp_path, monkeypatch, [{"percent": 25, "bake_minutes": FIRST_STEP},
                                       {"percent": 50, "bake_minutes": FIRST_STEP},
                                       {"percent": 75, "bake_minutes": FIRST_STEP},
                                       {"percent": 100, "bake_minutes": 4}])
    outcome = release("-errors", strategy="linear")

    assert_stopped_with_rollback(outcome, release_env["before"])
    bake = bake_of(outcome)
    assert bake is not None
    assert_steps(bake, [25.0], ["failed"])


def test_steps_ecs_cannot_run_are_refused_before_anything_is_deployed(release_env, tmp_path, monkeypatch, capfd):
    with_steps(tmp_path, monkeypatch, [{"percent": 10, "bake_minutes": 2}, {"percent": 50, "bake_minutes": 2},
                                       {"percent": 100, "bake_minutes": 5}])
    before_deployment = last_deployment().get("serviceDeploymentArn")
    outcome = release(strategy="canary")

    assert_rolled_back(outcome, release_env["before"], "ecs_deploy")
    assert last_deployment().get("serviceDeploymentArn") == before_deployment  # no deployment started
    log = "".join(capfd.readouterr())
    assert "the catalog's deploy.steps of auth-service: canary steps [10, 50, 100]: ECS's CANARY shifts one share" \
        in log


# ---- blue/green: green smoke-tested on the test listener before the production switch ------------------------------
@pytest.fixture()
def green_listener(monkeypatch: pytest.MonkeyPatch) -> int:
    """Name the sample service's test listener in auth-service's HTTP connection (extra ``test_listener_port``), as
    the devstack's connection will; return its port."""
    import json
    import urllib.request

    url = os.environ["OMNI_SAMPLE_URL_AUTH_SERVICE"]
    with urllib.request.urlopen(f"{url}/_devstack/listeners", timeout=5) as response:  # noqa: S310 - loopback
        port = int(json.load(response)["test_listener_port"])
    production = int(url.rsplit(":", 1)[1])
    monkeypatch.setenv("AIRFLOW_CONN_OMNI_HTTP_AUTH_SERVICE", json.dumps({
        "conn_type": "http", "host": "127.0.0.1", "port": production, "extra": {"test_listener_port": port}}))
    return port


def test_blue_green_smoke_tests_green_on_the_test_listener_then_switches(release_env, green_listener, capfd):
    outcome = release(strategy="blue_green")

    assert_released(outcome, release_env["before"])
    deployment = last_deployment()
    assert [h["lifecycleStages"] for h in deployment["deploymentConfiguration"]["lifecycleHooks"]] == [
        ["POST_TEST_TRAFFIC_SHIFT"]]
    log = "".join(capfd.readouterr())
    assert f"on the test listener http://127.0.0.1:{green_listener}" in log
    assert "(green, test listener) passed" in log and "answered ECS's hook SUCCEEDED" in log
    assert "Production traffic is on green" in log
    bake = bake_of(outcome)
    assert bake is not None and bake["verdict"] == "passed" and bake["steps"] == []


def test_an_unhealthy_green_is_refused_before_the_production_switch(release_env, green_listener, capfd):
    outcome = release("-unhealthy", strategy="blue_green")  # green's /health and /ready answer 503

    assert_rolled_back(outcome, release_env["before"], "smoke_test")
    assert outcome.task("monitoring_gate") == "upstream_failed", outcome.tasks
    deployment = last_deployment()
    assert deployment["status"] == "ROLLBACK_SUCCESSFUL", deployment
    # ECS rolled back from its test-traffic stage: production traffic never moved to green.
    assert deployment["statusReason"].startswith("Lifecycle hook at POST_TEST_TRAFFIC_SHIFT returned FAILED."), \
        deployment
    log = "".join(capfd.readouterr())
    assert "Answered ECS's test-traffic hook FAILED" in log
    assert "GET /health -> 503" in log
    assert "Production traffic is on green" not in log


def test_a_green_that_errors_under_production_traffic_is_rolled_back_during_ecs_bake(release_env, green_listener,
                                                                                      capfd):
    """-errors answers its health endpoints and /version well (the smoke tests on the test listener pass) and fails
    a quarter of its application traffic: only production traffic shows it, during ECS's bake after the switch, where
    the gate fails and rollback_ecs stops the deployment with ROLLBACK (blue still runs: ECS switches back at once)."""
    # ECS's bake after the switch: 60 "minutes" (60 s here). It must outlast smoke_test's end and regression_test,
    # which took 8 s alone and over 20 s under CI's load; the gate fails at its first reading, so the test never
    # waits the bake out.
    outcome = release("-errors", strategy="blue_green", bake_minutes=60)

    assert_rolled_back(outcome, release_env["before"], "monitoring_gate")
    assert outcome.task("smoke_test") == "success", outcome.tasks
    deployment = last_deployment()
    assert deployment["status"] == "ROLLBACK_SUCCESSFUL", deployment
    assert deployment["rollback"]["reason"] == "Rollback initiated by user.", deployment
    bake = bake_of(outcome)
    assert bake is not None and bake["reason"].startswith("5xx error rate "), bake
    log = "".join(capfd.readouterr())
    assert "answered ECS's hook SUCCEEDED" in log
