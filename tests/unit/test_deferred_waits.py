"""The long waits of a release hold no worker slot: rollback_ecs, rollback_<service>'s ECS step and finalize defer to
the ECS trigger with an absolute deadline, and come back to take the next step; ecs_deploy's retry keeps its deadline;
the monitoring gate fails, saying so, when CloudWatch stayed unreadable.

The ECS hook is a fake that answers each step from a script; the context is a fake task instance; nothing reaches
AWS or Airflow's database.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

from omnisphere_release.catalog import load_catalog
from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsNotOnTarget, ReturnStep
from omnisphere_release.operators import ecs as ecs_operators
from omnisphere_release.operators import finalize as finalize_operators
from omnisphere_release.operators.ecs import EcsDeployServiceOperator, EcsRollbackServiceOperator
from omnisphere_release.operators.finalize import ReleaseFinalizeOperator
from omnisphere_release.operators.manual_rollback import ManualRollbackStepOperator
from omnisphere_release.operators.monitoring import CloudWatchMonitoringGateOperator
from omnisphere_release.triggers.ecs import EcsServiceDeploymentTrigger

AUTH = load_catalog().get("auth-service")
DEPLOYMENT_ARN = "arn:aws:ecs:eu-west-1:123456789012:service-deployment/omnisphere/auth-service/abc123"
REDEPLOY_ARN = "arn:aws:ecs:eu-west-1:123456789012:service-deployment/omnisphere/auth-service/def456"
PREVIOUS = "arn:aws:ecs:eu-west-1:123456789012:task-definition/auth-service:7"
RELEASED = "arn:aws:ecs:eu-west-1:123456789012:task-definition/auth-service:8"


class FakeTaskInstance:
    def __init__(self, pushed: dict[tuple[str, str], Any]) -> None:
        self.pushed = pushed

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        # What the task under test pushed itself is newer than what the test put there beforehand.
        return self.pushed.get(("this task", key), self.pushed.get((task_ids, key)))

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[("this task", key)] = value


def context_with(pushed: dict[tuple[str, str], Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"ti": FakeTaskInstance(dict(pushed or {})), "run_id": "manual__test", **extra}


class FakeEcsHook:
    """Stands in for EcsDeploymentHook: each return_to answers the next scripted step (or raises it)."""

    def __init__(self, *steps: ReturnStep | Exception, deployment: dict[str, Any] | None = None) -> None:
        self.steps = list(steps)
        self.deployment = deployment
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.revision_of_run: str | None = RELEASED  # what ecs_deploy of the run under test registered

    def __call__(self, *args: Any, **kwargs: Any) -> FakeEcsHook:
        return self

    def return_to(self, *args: Any, **kwargs: Any) -> ReturnStep:
        self.calls.append(("return_to", args, kwargs))
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    def describe_deployment(self, arn: str) -> dict[str, Any]:
        self.calls.append(("describe_deployment", (arn,), {}))
        assert self.deployment is not None
        return self.deployment

    def find_revision_of_run(self, family: str, run_tag: str) -> str | None:
        self.calls.append(("find_revision_of_run", (family, run_tag), {}))
        return self.revision_of_run

    def describe_service(self, cluster: str, service: str) -> dict[str, Any]:
        return {"taskDefinition": RELEASED, "currentServiceDeployment": DEPLOYMENT_ARN}


@pytest.fixture
def ecs(monkeypatch: pytest.MonkeyPatch):
    def install(*steps: ReturnStep | Exception, deployment: dict[str, Any] | None = None) -> FakeEcsHook:
        hook = FakeEcsHook(*steps, deployment=deployment)
        monkeypatch.setattr(ecs_operators, "EcsDeploymentHook", hook)
        monkeypatch.setattr(finalize_operators, "EcsDeploymentHook", hook)
        return hook

    return install


PLAN = {("preflight", "return_value"): {"previous_task_definition": PREVIOUS, "schema_version": 2}}


def rollback_ecs() -> EcsRollbackServiceOperator:
    return EcsRollbackServiceOperator(task_id="rollback_ecs", service="auth-service", poll_seconds=2)


def deferred(call: Any) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as raised:
        call()
    return raised.value


# --- rollback_ecs and rollback_<service>'s ECS step -------------------------------------------------------------------


def test_rollback_ecs_defers_while_ecs_rolls_back_instead_of_sleeping(ecs):
    hook = ecs(ReturnStep("stopped in-flight deployment with ROLLBACK", DEPLOYMENT_ARN))
    before = time.time()

    context = context_with(PLAN)

    deferral = deferred(lambda: rollback_ecs().execute(context))

    trigger = deferral.trigger
    assert isinstance(trigger, EcsServiceDeploymentTrigger)
    assert trigger.deployment_arn == DEPLOYMENT_ARN
    assert trigger.settle is True  # any end of the stopped deployment, not only success
    assert trigger.aws_conn_id == AUTH.aws_conn_id and trigger.poll_seconds == 2
    # An absolute deadline: a stop then a redeploy, each within deploy.timeout_minutes.
    budget = 2 * AUTH.deploy.timeout_minutes * 60
    assert before + budget <= trigger.deadline <= time.time() + budget
    assert deferral.method_name == "resume_return"
    # Where the way back stands is kept for the next step, as ecs_deploy keeps its deployment: in the task's XCom.
    assert context["ti"].pushed[("this task", "way_back")] == {
        "task_definition": PREVIOUS, "actions": ["stopped in-flight deployment with ROLLBACK"],
        "deadline": trigger.deadline}
    assert hook.calls == [("find_revision_of_run", ("auth-service", "adhoc_airflow/manual__test"), {}),
                          ("return_to", (AUTH.ecs.cluster, AUTH.ecs.service, PREVIOUS), {"redeployed": False})]


def test_rollback_ecs_takes_the_next_step_when_the_deployment_settled_and_ends_on_target(ecs):
    hook = ecs(ReturnStep(f"redeployed {PREVIOUS}", REDEPLOY_ARN), ReturnStep(None, None))
    deadline = time.time() + 600
    event = {"status": "settled", "deployment_status": "ROLLBACK_SUCCESSFUL", "summary": "ROLLBACK_SUCCESSFUL at "
             "CLEAN_UP", "deployment_arn": DEPLOYMENT_ARN}
    operator = rollback_ecs()
    context = context_with({**PLAN, ("rollback_ecs", "way_back"): {
        "task_definition": PREVIOUS, "actions": ["stopped in-flight deployment with ROLLBACK"], "deadline": deadline}})

    deferral = deferred(lambda: operator.resume_return(context, event))
    assert deferral.trigger.deployment_arn == REDEPLOY_ARN
    assert deferral.trigger.deadline == deadline  # carried across deferrals, never extended
    way_back = context["ti"].pushed[("this task", "way_back")]
    assert way_back["actions"] == ["stopped in-flight deployment with ROLLBACK", f"redeployed {PREVIOUS}"]

    settled = {**event, "deployment_status": "SUCCESSFUL", "deployment_arn": REDEPLOY_ARN}
    result = operator.resume_return(context, settled)

    assert result == {"action": f"stopped in-flight deployment with ROLLBACK and redeployed {PREVIOUS}",
                      "task_definition": PREVIOUS}
    # After a redeploy, the hook is told so: ending elsewhere then is final, never a second redeploy.
    assert [call[2] for call in hook.calls] == [{"redeployed": False}, {"redeployed": True}]


def test_rollback_ecs_with_nothing_to_do_finishes_without_deferring(ecs):
    ecs(ReturnStep(None, None))

    assert rollback_ecs().execute(context_with(PLAN)) == {"action": "none", "task_definition": PREVIOUS}


def test_rollback_ecs_leaves_alone_what_its_run_did_not_deploy(ecs):
    """A run refused when approved, after a hotfix went first while it waited, must not "roll back" the hotfix."""
    hook = ecs(ReturnStep("redeployed the previous revision", REDEPLOY_ARN))
    hook.revision_of_run = None
    assert rollback_ecs().execute(context_with(PLAN)) == {"action": "none", "deployed": False}
    assert hook.calls == [("find_revision_of_run", ("auth-service", "adhoc_airflow/manual__test"), {})]


def test_rollback_ecs_without_a_plan_does_nothing(ecs):
    hook = ecs()

    assert rollback_ecs().execute(context_with()) == {"action": "none"}
    assert hook.calls == []


@pytest.mark.parametrize("event", [
    {"status": "timeout", "deployment_status": "ROLLBACK_IN_PROGRESS", "summary": "ROLLBACK_IN_PROGRESS at SCALE_UP",
     "deployment_arn": DEPLOYMENT_ARN},
    {"status": "error", "message": "cannot read the deployment for 300s: ThrottlingException",
     "deployment_arn": DEPLOYMENT_ARN},
], ids=["timeout", "unreadable"])
def test_a_way_back_that_could_not_be_followed_is_retried_not_failed_for_good(ecs, event):
    ecs()

    with pytest.raises(AirflowException) as raised:
        rollback_ecs().resume_return(context_with(PLAN), event)

    assert type(raised.value) is AirflowException  # a retry looks at the service again and goes on from there
    message = str(raised.value)
    assert message.startswith(f"ECS rollback of auth-service could not finish: deployment {DEPLOYMENT_ARN} "
                              f"{event['status']}: ")
    assert "Retrying if retries remain" in message


def test_a_way_back_still_in_flight_at_the_deadline_is_retried_not_deferred_again(ecs):
    ecs(ReturnStep(None, DEPLOYMENT_ARN))
    event = {"status": "settled", "deployment_status": "ROLLBACK_SUCCESSFUL", "deployment_arn": REDEPLOY_ARN}

    context = context_with({("rollback_ecs", "way_back"): {"task_definition": PREVIOUS, "actions": [],
                                                            "deadline": time.time() - 1}})

    with pytest.raises(AirflowException, match=f"deployment {DEPLOYMENT_ARN} is still in flight at the deadline"):
        rollback_ecs().resume_return(context, event)


def test_the_way_back_ending_on_another_revision_fails_for_good(ecs):
    ecs(EcsNotOnTarget(f"ECS service omnisphere/auth-service ended on {RELEASED}, not {PREVIOUS}"))

    with pytest.raises(AirflowFailException) as raised:
        rollback_ecs().execute(context_with(PLAN))

    assert str(raised.value) == (f"ECS rollback of auth-service failed: ECS service omnisphere/auth-service ended on "
                                 f"{RELEASED}, not {PREVIOUS}. The schema is left as is. Page the service owner.")


def test_the_way_back_interrupted_by_an_aws_error_is_retried_not_failed_for_good(ecs):
    ecs(EcsDeploymentError("describe service omnisphere/auth-service: ThrottlingException"))

    with pytest.raises(AirflowException) as raised:
        rollback_ecs().execute(context_with(PLAN))

    assert type(raised.value) is AirflowException
    assert str(raised.value) == ("ECS rollback of auth-service could not finish: describe service "
                                 "omnisphere/auth-service: ThrottlingException. Retrying if retries remain; the "
                                 "service may still run the new image.")


def test_the_manual_rollbacks_ecs_step_is_the_same_deferred_way_back(ecs):
    hook = ecs(ReturnStep(f"redeployed {PREVIOUS}", REDEPLOY_ARN), ReturnStep(None, None))
    step = ManualRollbackStepOperator(task_id="rollback_ecs", service="auth-service", step="ecs")
    context = context_with({("plan", "return_value"): {"service": "auth-service", "reason": "bad release",
                                                      "task_definition": PREVIOUS}})

    deferral = deferred(lambda: step.execute(context))
    assert isinstance(deferral.trigger, EcsServiceDeploymentTrigger) and deferral.trigger.settle
    assert deferral.method_name == "resume_return"

    result = step.resume_return(context, {"status": "settled", "deployment_status": "SUCCESSFUL",
                                          "deployment_arn": REDEPLOY_ARN})

    assert result == {"action": f"redeployed {PREVIOUS}", "task_definition": PREVIOUS}
    assert len(hook.calls) == 2


# --- finalize -----------------------------------------------------------------------------------------------------------

DEPLOYED = {("ecs_deploy", "return_value"): {"deployment_arn": DEPLOYMENT_ARN, "task_definition": RELEASED},
            **PLAN}


def finalize() -> ReleaseFinalizeOperator:
    return ReleaseFinalizeOperator(task_id="finalize", service="auth-service", poll_seconds=3)


def test_finalize_defers_while_ecs_cleans_up(ecs):
    ecs(deployment={"serviceDeploymentArn": DEPLOYMENT_ARN, "status": "IN_PROGRESS", "lifecycleStage": "BAKE_TIME"})
    before = time.time()

    deferral = deferred(lambda: finalize().execute(context_with(DEPLOYED)))

    trigger = deferral.trigger
    assert isinstance(trigger, EcsServiceDeploymentTrigger)
    assert (trigger.deployment_arn, trigger.settle, trigger.poll_seconds) == (DEPLOYMENT_ARN, True, 3)
    timeout = AUTH.deploy.timeout_minutes * 60
    assert before + timeout <= trigger.deadline <= time.time() + timeout
    assert deferral.method_name == "execute_complete"


@pytest.mark.parametrize("status", ["FAILED", "STOPPED", "ROLLBACK_SUCCESSFUL"])
def test_finalize_fails_for_good_when_the_deployment_ended_otherwise(ecs, status):
    ecs(deployment={"serviceDeploymentArn": DEPLOYMENT_ARN, "status": status, "statusReason": "alarm"})

    with pytest.raises(AirflowFailException, match=f"The deployment ended {status} after the gate passed: alarm"):
        finalize().execute(context_with(DEPLOYED))

    with pytest.raises(AirflowFailException, match=f"The deployment ended {status} after the gate passed: alarm"):
        finalize().execute_complete(context_with(DEPLOYED), {"status": "settled", "deployment_status": status,
                                                             "reason": "alarm", "deployment_arn": DEPLOYMENT_ARN})


def test_finalize_past_its_deadline_fails_for_good_and_the_release_rolls_back():
    event = {"status": "timeout", "deployment_status": "IN_PROGRESS", "summary": "IN_PROGRESS at BAKE_TIME",
             "deployment_arn": DEPLOYMENT_ARN}

    with pytest.raises(AirflowFailException, match="did not finish within the catalog's deploy.timeout_minutes"):
        finalize().execute_complete(context_with(DEPLOYED), event)


def test_finalize_that_could_not_read_the_deployment_is_retried():
    event = {"status": "error", "message": "cannot read the deployment for 300s: ...", "deployment_arn": DEPLOYMENT_ARN}

    with pytest.raises(AirflowException) as raised:
        finalize().execute_complete(context_with(DEPLOYED), event)

    assert type(raised.value) is AirflowException
    assert "Retrying if retries remain" in str(raised.value)


# --- ecs_deploy: a retry keeps the deadline; monitoring_gate: an unreadable CloudWatch ------------------------------


def test_a_retry_of_ecs_deploy_reattaches_with_the_deadline_of_the_first_try(ecs):
    started = time.time() - 300  # the first try started the deployment five minutes ago
    ecs(deployment={"serviceDeploymentArn": DEPLOYMENT_ARN, "status": "IN_PROGRESS",
                    "startedAt": datetime.fromtimestamp(started, timezone.utc)})
    deploy = EcsDeployServiceOperator(task_id="ecs_deploy", service="auth-service", strategy="rolling",
                                      bake_minutes=1)
    context = context_with({("preflight", "return_value"): {"previous_task_definition": PREVIOUS}},
                           run_id="manual__1")
    context["ti"].dag_id = "release_auth-service"

    deferral = deferred(lambda: deploy.execute(context))

    assert deferral.trigger.deployment_arn == DEPLOYMENT_ARN
    assert deferral.trigger.deadline == pytest.approx(started + AUTH.deploy.timeout_minutes * 60)


def test_the_gate_fails_saying_for_how_long_cloudwatch_could_not_be_read():
    gate = CloudWatchMonitoringGateOperator(task_id="monitoring_gate", service="auth-service", bake_minutes=5)
    reason = ("CloudWatch could not be read for 61s (limit 60s, the catalog's monitoring.missing_data_minutes): "
              "Could not connect to the endpoint URL; a bake nobody could watch proves nothing, treated as a failure")

    with pytest.raises(AirflowFailException) as raised:
        gate.execute_complete(context_with(), {"status": "unreadable", "reason": reason, "observations": []})

    assert str(raised.value) == f"Monitoring gate failed: {reason}. Next: the release rolls back."


# --- smoke_test's wait for the blue/green switch ---------------------------------------------------------------------


class FakeSmokeHook:
    """Stands in for SmokeTestHook: every probe round passes, and the rounds are counted."""

    rounds = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def url_from_endpoint(self, endpoint: str) -> str:
        return "http://auth-service.test/"

    def probe_until_deadline(self, checks: Any, deadline_seconds: float, what: str, also: Any = None) -> list[Any]:
        from omnisphere_release.hooks.http import ProbeResult

        FakeSmokeHook.rounds += 1
        return [ProbeResult(check.path, True, 200, 5.0) for check in checks]


@pytest.fixture
def blue_green(monkeypatch: pytest.MonkeyPatch):
    """smoke_test of a blue/green deployment held at ECS's test-traffic hook; green's own test passes."""
    from omnisphere_release.operators import smoke as smoke_operators

    FakeSmokeHook.rounds = 0
    monkeypatch.setattr(smoke_operators, "SmokeTestHook", FakeSmokeHook)
    monkeypatch.setattr(smoke_operators.HttpSmokeTestOperator, "_test_green", lambda *args: None)
    operator = smoke_operators.HttpSmokeTestOperator(task_id="smoke_test", service="auth-service")
    pushed = {("preflight", "return_value"): {"target_image": "auth:2", "target_image_digest": "sha256:2",
                                              "image_tag": "2"},
              ("ecs_deploy", "return_value"): {"deployment_arn": DEPLOYMENT_ARN, "test_traffic_hook": "/hooks/x"}}
    return operator, context_with(pushed)


def test_smoke_test_waits_for_the_switch_to_green_deferred_not_on_a_worker(blue_green):
    operator, context = blue_green
    before = time.time()
    deferral = deferred(lambda: operator.execute(context))
    trigger = deferral.trigger
    assert isinstance(trigger, EcsServiceDeploymentTrigger) and deferral.method_name == "after_switch"
    assert trigger.deployment_arn == DEPLOYMENT_ARN and trigger.done_on_traffic_shift and not trigger.settle
    assert before + 120 <= trigger.deadline <= time.time() + 120  # absolute: a restarted triggerer does not extend it
    assert FakeSmokeHook.rounds == 0  # production is probed only once it is on green


def test_after_the_switch_production_is_smoke_tested_and_a_failed_switch_rolls_back(blue_green):
    operator, context = blue_green
    assert operator.after_switch(context, {"status": "success", "summary": "all traffic on green"})["endpoints"]
    assert FakeSmokeHook.rounds == 1
    with pytest.raises(AirflowFailException, match="ECS did not switch production to green of auth-service"):
        operator.after_switch(context, {"status": "failed", "summary": "ROLLBACK_SUCCESSFUL"})
    with pytest.raises(AirflowException, match="Retrying if retries remain") as raised:
        operator.after_switch(context, {"status": "error", "message": "cannot read the deployment for 300s"})
    assert not isinstance(raised.value, AirflowFailException)  # unreadable is not a failed switch
