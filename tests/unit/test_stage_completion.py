"""How the deferrable stages end: ``execute_complete`` reads the trigger's event and what the stage pushed before it
deferred, and returns the stage's output or fails the task (AirflowFailException: no retry).

The one ECS way back (rollback_ecs and rollback_<service>), now deferred, is tested in test_deferred_waits.py.
The operators are built outside a DAG; the context is a fake task instance; nothing reaches Airflow's database or AWS.
"""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import load_catalog
from omnisphere_release.hooks.ecs import EcsDeploymentError
from omnisphere_release.operators import ecs as ecs_operators
from omnisphere_release.operators.ecs import EcsDeployServiceOperator
from omnisphere_release.operators.monitoring import CloudWatchMonitoringGateOperator
from omnisphere_release.operators.window import WaitForMaintenanceWindowOperator

DEPLOYMENT_ARN = "arn:aws:ecs:eu-west-1:123456789012:service-deployment/omnisphere/auth-service/abc123"
PREVIOUS = "arn:aws:ecs:eu-west-1:123456789012:task-definition/auth-service:7"
RELEASED = "arn:aws:ecs:eu-west-1:123456789012:task-definition/auth-service:8"
ROLLING = {"strategy": "ROLLING", "maximumPercent": 200, "minimumHealthyPercent": 100,
           "deploymentCircuitBreaker": {"enable": True, "rollback": True}}


class FakeTaskInstance:
    """Answers xcom_pull from what stages pushed, by (task id, key), and records what was asked and pushed."""

    def __init__(self, pushed: dict[tuple[str, str], Any], task_id: str = "this_task") -> None:
        self.pushed = pushed
        self.task_id = task_id
        self.pulls: list[tuple[str, str]] = []

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        self.pulls.append((task_ids, key))
        return self.pushed.get((task_ids, key))

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[(self.task_id, key)] = value


def context_with(pushed: dict[tuple[str, str], Any]) -> dict[str, Any]:
    return {"ti": FakeTaskInstance(pushed)}


# --- ecs_deploy ----------------------------------------------------------------------------------------------------

STARTED = {"deployment_arn": DEPLOYMENT_ARN, "task_definition": RELEASED, "configuration": ROLLING}
SUMMARY = "SUCCESSFUL at CLEAN_UP: 2/2 new tasks running, 100.0% of traffic; "


def ecs_deploy() -> EcsDeployServiceOperator:
    return EcsDeployServiceOperator(task_id="ecs_deploy", service="auth-service", strategy="rolling", bake_minutes=1)


@pytest.mark.parametrize("deployment_status", ["SUCCESSFUL", "IN_PROGRESS"])  # IN_PROGRESS: traffic shifted, baking
def test_ecs_deploy_success_returns_the_deployment_it_started_and_how_it_ended(deployment_status):
    context = context_with({("ecs_deploy", "deployment"): dict(STARTED)})
    event = {"status": "success", "deployment_status": deployment_status, "summary": SUMMARY,
             "deployment_arn": DEPLOYMENT_ARN}

    output = ecs_deploy().execute_complete(context, event)

    assert output == {**STARTED, "deployment_status": deployment_status, "summary": SUMMARY}
    assert context["ti"].pulls == [("ecs_deploy", "deployment")]  # what this task pushed before deferring


def test_ecs_deploy_of_steps_says_when_the_first_share_came_for_the_gate_to_analyse_from():
    steps = [{"percent": 10.0, "bake_minutes": 2}, {"percent": 100.0, "bake_minutes": 5}]
    context = context_with({("ecs_deploy", "deployment"): {**STARTED, "steps": steps}})
    event = {"status": "success", "deployment_status": "IN_PROGRESS", "summary": SUMMARY,
             "deployment_arn": DEPLOYMENT_ARN, "after": 1_760_000_000.0}

    output = ecs_deploy().execute_complete(context, event)

    assert output["first_share_after"] == 1_760_000_000.0  # the trigger's last read without the share
    assert output["steps"] == steps


def test_ecs_deploy_timeout_fails_for_good_and_says_rollback_ecs_stops_the_deployment():
    event = {"status": "timeout", "deployment_status": "IN_PROGRESS",
             "summary": "IN_PROGRESS at SCALE_UP: 1/2 new tasks running, 0.0% of traffic; ",
             "deployment_arn": DEPLOYMENT_ARN}

    with pytest.raises(AirflowFailException) as raised:
        ecs_deploy().execute_complete(context_with({("ecs_deploy", "deployment"): dict(STARTED)}), event)

    message = str(raised.value)
    assert f"ECS deployment {DEPLOYMENT_ARN} did not finish within the catalog's deploy.timeout_minutes" in message
    assert "last state: IN_PROGRESS at SCALE_UP: 1/2 new tasks running" in message
    assert message.endswith("Next: rollback_ecs stops it with ROLLBACK.")


def test_ecs_deploy_failure_fails_for_good_naming_the_deployment_and_ecss_reason():
    reason = "ECS deployment circuit breaker: tasks failed to start."
    event = {"status": "failed", "deployment_status": "ROLLBACK_SUCCESSFUL",
             "summary": f"ROLLBACK_SUCCESSFUL at CLEAN_UP: 0/2 new tasks running, 0.0% of traffic; {reason}",
             "reason": reason, "deployment_arn": DEPLOYMENT_ARN}

    with pytest.raises(AirflowFailException) as raised:
        ecs_deploy().execute_complete(context_with({("ecs_deploy", "deployment"): dict(STARTED)}), event)

    message = str(raised.value)
    assert message.startswith(f"ECS deployment {DEPLOYMENT_ARN} failed: ROLLBACK_SUCCESSFUL at CLEAN_UP")
    assert reason in message
    assert message.endswith("Next: rollback_ecs makes sure the service is back on its previous revision.")


def test_ecs_deploy_is_retried_when_its_trigger_could_not_read_the_deployment():
    # Not reading the deployment says nothing about it: a retry reattaches to the same deployment, no rollback.
    event = {"status": "error", "deployment_arn": DEPLOYMENT_ARN,
             "message": "cannot read the deployment: describe deployment: AccessDeniedException"}

    with pytest.raises(AirflowException) as raised:
        ecs_deploy().execute_complete(context_with({("ecs_deploy", "deployment"): dict(STARTED)}), event)

    assert not isinstance(raised.value, AirflowFailException)
    message = str(raised.value)
    assert message.startswith(f"Could not follow ECS deployment {DEPLOYMENT_ARN}: cannot read the deployment: ")
    assert "AccessDeniedException" in message and "reattaches" in message


# --- ecs_deploy could not start; rollback_ecs and rollback_<service> -------------------------------------------------

AUTH = load_catalog().get("auth-service")


class FakeEcsHook:
    """Stands in for EcsDeploymentHook in operators.ecs: find_revision_of_run raises ``outcome``, if an error."""

    instances: list[FakeEcsHook] = []

    def __init__(self, aws_conn_id: str | None = "aws_default", *args: Any, outcome: Any = None, **kwargs: Any):
        self.aws_conn_id = aws_conn_id
        self.outcome = outcome
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        FakeEcsHook.instances.append(self)

    def find_revision_of_run(self, *args: Any) -> str | None:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return None


@pytest.fixture
def ecs_hook_answers(monkeypatch: pytest.MonkeyPatch):
    """Make operators.ecs build a FakeEcsHook that answers ``outcome``; return the hooks built."""
    FakeEcsHook.instances = []

    def answering(outcome: Any) -> list[FakeEcsHook]:
        monkeypatch.setattr(ecs_operators, "EcsDeploymentHook",
                            lambda *args, **kwargs: FakeEcsHook(*args, outcome=outcome, **kwargs))
        return FakeEcsHook.instances

    return answering


def test_ecs_deploy_that_cannot_start_is_retried_not_failed_for_good(ecs_hook_answers):
    ecs_hook_answers(EcsDeploymentError("list revisions of auth-service: ThrottlingException"))
    plan = {"previous_task_definition": PREVIOUS, "target_image": "auth:1.5.0"}
    context = {**context_with({("preflight", "return_value"): plan}), "run_id": "manual__2026-11-29T01:00:00"}

    with pytest.raises(AirflowException) as raised:
        ecs_deploy().execute(context)

    # An AWS glitch before anything started: a retry reattaches to the run's revision, so it may retry.
    assert type(raised.value) is AirflowException
    assert str(raised.value) == ("ECS deploy of auth-service could not start: list revisions of auth-service: "
                                 "ThrottlingException")


# --- monitoring_gate -----------------------------------------------------------------------------------------------

OBSERVATIONS = ["01:05:00 1000 requests, 2 5xx (0.20%), p99 180 ms, alarms OK",
                "01:05:10 1010 requests, 40 5xx (3.96%), p99 190 ms, alarms OK"]


def monitoring_gate() -> CloudWatchMonitoringGateOperator:
    return CloudWatchMonitoringGateOperator(task_id="monitoring_gate", service="auth-service", bake_minutes=1)


def test_monitoring_gate_success_returns_what_it_observed():
    event = {"status": "success", "observations": OBSERVATIONS[:1], "last": OBSERVATIONS[0]}

    assert monitoring_gate().execute_complete(context_with({}), event) == {"observations": OBSERVATIONS[:1]}


@pytest.mark.parametrize("event", [
    {"status": "breach", "reason": "5xx rate 3.96% > 2.00%", "observations": OBSERVATIONS},
    {"status": "no_data", "reason": "no requests seen for 200s (limit 180s): the service may be down or "
                                    "unobserved; treated as a failure", "observations": OBSERVATIONS},
    {"status": "window_closed", "reason": "the maintenance window closed during the bake",
     "observations": OBSERVATIONS},
    {"status": "error", "message": "cannot read CloudWatch: AccessDenied", "observations": []},
], ids=lambda event: event["status"])
def test_monitoring_gate_fails_for_good_with_the_triggers_reason(event):
    with pytest.raises(AirflowFailException) as raised:
        monitoring_gate().execute_complete(context_with({}), event)

    reason = event.get("reason") or event["message"]
    assert str(raised.value) == f"Monitoring gate failed: {reason}. Next: the release rolls back."


# --- wait_for_window -----------------------------------------------------------------------------------------------


def test_wait_for_window_returns_the_decision_it_made_before_waiting():
    decision = {"mode": "window", "force_reason": "", "window_start": "2026-11-29T01:00:00+00:00",
                "window_end": "2026-11-29T03:00:00+00:00"}
    context = context_with({("wait_for_window", "window"): dict(decision)})
    operator = WaitForMaintenanceWindowOperator(task_id="wait_for_window", service="auth-service")

    output = operator.execute_complete(context, {"moment": "2026-11-29T01:00:00+00:00"})

    assert output == {**decision, "waited_deferred": True}
    assert context["ti"].pulls == [("wait_for_window", "window")]


# --- whether a lease's run has ended ---------------------------------------------------------------------------------

class FakeTi:
    def __init__(self, answer: object) -> None:
        self.answer = answer

    def get_dagrun_state(self, dag_id: str, run_id: str) -> object:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_a_lease_is_over_when_its_run_ended_or_no_longer_exists():
    from airflow.sdk.exceptions import AirflowRuntimeError, ErrorType
    from airflow.utils.state import DagRunState

    from omnisphere_release.locks import Holder
    from omnisphere_release.operators.common import run_is_over

    holder = Holder("release_auth-service", "manual__1", "preflight", "release")
    assert run_is_over(FakeTi(DagRunState.FAILED), holder) and run_is_over(FakeTi("success"), holder)
    assert not run_is_over(FakeTi(DagRunState.RUNNING), holder) and not run_is_over(FakeTi("queued"), holder)

    class Response:
        status_code = 404

    class ServerResponseError(Exception):
        response = Response()

    assert run_is_over(FakeTi(ServerResponseError("Server returned error")), holder)  # in process (dag.test)
    from airflow.sdk.execution_time.comms import ErrorResponse

    not_found = AirflowRuntimeError(ErrorResponse(error=ErrorType.API_SERVER_ERROR, detail={"status_code": 404}))
    assert run_is_over(FakeTi(not_found), holder)  # under a supervisor


def test_a_lease_is_not_taken_over_when_the_api_cannot_say():
    from omnisphere_release.locks import Holder
    from omnisphere_release.operators.common import run_is_over

    holder = Holder("release_auth-service", "manual__1", "preflight", "release")
    with pytest.raises(AirflowException, match="Cannot tell whether release .* is still going") as raised:
        run_is_over(FakeTi(ConnectionError("API server unreachable")), holder)
    assert not isinstance(raised.value, AirflowFailException)  # retried, never a take-over on a guess


# --- release_all: each release's window --------------------------------------------------------------------------

class FakeVariable:
    values: dict[str, object] = {}

    @classmethod
    def get(cls, key: str, default: object = None, deserialize_json: bool = False) -> object:
        return cls.values.get(key, default)

    @classmethod
    def set(cls, key: str, value: object, serialize_json: bool = False) -> None:
        cls.values[key] = value


@pytest.fixture()
def check_manifest(monkeypatch):
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from airflow.dag_processing.dagbag import DagBag

    import omnisphere_release.operators.release_all as release_all

    FakeVariable.values = {}
    accepted: list[tuple] = []  # (environment, force_reason) each manifest was checked for
    monkeypatch.setattr(release_all, "Variable", FakeVariable)
    monkeypatch.setattr(release_all, "accept_manifest",
                        lambda catalog, manifest, log, refusal, environment=None, force_reason="":
                        accepted.append((environment, force_reason)) or manifest)
    task = DagBag(dag_folder="dags").dags["release_all"].get_task("check_manifest")

    def run(params: dict, run_type: str = "manual") -> dict:
        full = {"manifest": {}, "reason": None, "environment": "staging", "force_reason": None, **params}
        start = datetime(2026, 11, 29, 1, 0, tzinfo=timezone.utc)
        FakeVariable.values["omni_release_queue"] = {"2026-11-29T01:00+00:00": {
            "manifest": full["manifest"], "reason": "queued", "environment": "production"}}
        context = {"params": full, "dag_run": SimpleNamespace(run_type=run_type, conf=params),
                   "data_interval_start": start, "run_id": "rid"}
        return task.execute(context)

    run.accepted = accepted  # type: ignore[attr-defined]
    return run


def test_a_hand_triggered_release_all_releases_each_service_in_its_own_window(check_manifest):
    out = check_manifest({"manifest": {"auth-service": "1.4.0", "billing-service": "2.0.0"}, "reason": "train 12"})
    assert out["order"] == ["auth-service", "billing-service"]
    assert out["release_confs"]["billing-service"] == {
        "image_tag": "2.0.0", "reason": "release_all rid: train 12", "window": "next", "force_reason": "",
        "environment": "staging"}


def test_a_hand_triggered_release_all_forced_with_a_reason_releases_now(check_manifest):
    out = check_manifest({"manifest": {"auth-service": "1.4.0"}, "force_reason": "  incident 42\n"})
    conf = out["release_confs"]["auth-service"]
    assert (conf["window"], conf["force_reason"]) == ("now", "release_all forced: incident 42")
    # Forcing the window is not overriding the promotion rule: the images still need their evidence.
    assert check_manifest.accepted == [("staging", "")] and "evidence_override" not in conf


def test_a_hand_triggered_release_all_with_an_evidence_override_passes_it_to_every_release(check_manifest):
    out = check_manifest({"manifest": {"auth-service": "1.4.0"}, "evidence_override": " incident 43 "})
    # Each release's preflight records the override (and waits for an approver where the environment needs one).
    assert out["release_confs"]["auth-service"]["evidence_override"] == "incident 43"
    assert check_manifest.accepted == [("staging", "incident 43")]


def test_a_scheduled_release_all_releases_in_its_window_in_the_queued_environment_with_its_evidence(check_manifest):
    out = check_manifest({"manifest": {"auth-service": "1.4.0"}}, run_type="scheduled")
    conf = out["release_confs"]["auth-service"]
    assert conf["window"] == "now" and conf["force_reason"].startswith("in the release_all window 2026-11-29T01:00")
    assert conf["environment"] == "production" and conf["reason"] == "release_all rid: queued"
    # The window's own reason never overrides the promotion rule: the queued images need their evidence.
    assert check_manifest.accepted == [("production", "")]


def test_release_all_refuses_an_unknown_param(check_manifest):
    with pytest.raises(AirflowFailException, match=r"'forcereason' \(did you mean 'force_reason'\?\)"):
        check_manifest({"manifest": {"auth-service": "1.4.0"}, "forcereason": "x"})
