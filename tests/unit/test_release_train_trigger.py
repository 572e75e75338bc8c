"""A release train's start gate waits in the triggerer, not on a worker: the trigger fires once the gate's decision is
no longer "wait", a failed read of the task states only delays it, and the operator decides again when it wakes up."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowSkipException, TaskDeferred

from omnisphere_release.operators.release_all import ReleaseTrainSlotOperator
from omnisphere_release.triggers import release_train as trigger_module
from omnisphere_release.triggers.release_train import ReleaseTrainSlotTrigger

ORDER = ["auth-service", "billing-service", "search-service"]
RUN = "manual__2026-11-26"


class FakeTaskStates:
    """Airflow's RuntimeTaskInstance.get_task_states, answering a scripted sequence (an exception is raised)."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls = 0

    def __call__(self, dag_id: str, run_ids: list[str]) -> dict[str, dict[str, str]]:
        assert (dag_id, run_ids) == ("release_all", [RUN])
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        return answer


def first_event(trigger: ReleaseTrainSlotTrigger, timeout: float = 5) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(run(), timeout))


HOLDING_ONE = {"start_auth-service": "success", "release_auth-service": "running",
               "start_billing-service": "deferred", "start_search-service": "deferred"}
AUTH_RELEASED = {**HOLDING_ONE, "release_auth-service": "success"}
AUTH_FAILED = {**HOLDING_ONE, "release_auth-service": "failed"}


def test_the_trigger_waits_while_the_slots_are_held_and_fires_when_one_frees(monkeypatch):
    fake = FakeTaskStates([{RUN: HOLDING_ONE}, {RUN: HOLDING_ONE}, {RUN: AUTH_RELEASED}])
    monkeypatch.setattr(trigger_module.RuntimeTaskInstance, "get_task_states", fake)
    trigger = ReleaseTrainSlotTrigger("release_all", RUN, "billing-service", ORDER, 1, poll_seconds=0.01)
    assert first_event(trigger) == {"action": "go", "why": "slot 1 of 1"}
    assert fake.calls == 3


def test_the_second_in_line_keeps_waiting_when_one_slot_frees(monkeypatch):
    fake = FakeTaskStates([{RUN: AUTH_RELEASED}])
    monkeypatch.setattr(trigger_module.RuntimeTaskInstance, "get_task_states", fake)
    trigger = ReleaseTrainSlotTrigger("release_all", RUN, "search-service", ORDER, 1, poll_seconds=0.01)
    with pytest.raises(TimeoutError):
        first_event(trigger, timeout=0.3)
    assert fake.calls > 3


def test_a_failed_release_makes_the_waiting_gate_skip_and_a_failed_read_only_delays(monkeypatch):
    fake = FakeTaskStates([ConnectionError("execution API restarting"), {RUN: AUTH_FAILED}])
    monkeypatch.setattr(trigger_module.RuntimeTaskInstance, "get_task_states", fake)
    trigger = ReleaseTrainSlotTrigger("release_all", RUN, "billing-service", ORDER, 1, poll_seconds=0.01)
    assert first_event(trigger) == {"action": "skip", "why": "not started after auth-service failed"}


def test_the_trigger_serializes_every_argument():
    trigger = ReleaseTrainSlotTrigger("release_all", RUN, "billing-service", ORDER, 2, poll_seconds=3)
    path, kwargs = trigger.serialize()
    assert path == "omnisphere_release.triggers.release_train.ReleaseTrainSlotTrigger"
    assert ReleaseTrainSlotTrigger(**kwargs).serialize() == (path, kwargs)


class FakeRun:
    def __init__(self, task_states: dict[str, str]) -> None:
        self._states = task_states

    def output(self, task_id: str) -> dict[str, Any]:
        return {"order": ORDER, "max_parallel": 1,
                "manifest": dict.fromkeys(ORDER, "1.4.0")}

    def task_states(self) -> dict[str, str]:
        return self._states


@pytest.fixture
def gate(monkeypatch):
    from omnisphere_release.operators import release_all as module

    current: dict[str, dict[str, str]] = {"states": HOLDING_ONE}
    monkeypatch.setattr(module, "ReleaseRun", lambda context: FakeRun(current["states"]))
    operator = ReleaseTrainSlotOperator(task_id="start_billing-service", service="billing-service")
    context = {"dag": type("Dag", (), {"dag_id": "release_all"})(), "run_id": RUN}
    return operator, context, current


def test_the_gate_defers_with_an_absolute_deadline_that_a_second_wait_keeps(gate):
    operator, context, _ = gate
    with pytest.raises(TaskDeferred) as first:
        operator.execute(context)
    deadline = first.value.kwargs["deadline"]
    assert deadline == pytest.approx(time.time() + operator.MAX_WAIT.total_seconds(), abs=5)
    assert first.value.trigger.service == "billing-service"
    # The trigger fired, but another gate took the slot first: it waits again, with the same deadline.
    with pytest.raises(TaskDeferred) as again:
        operator.execute_complete(context, {"action": "go", "why": "slot 1 of 1"}, deadline=deadline)
    assert again.value.kwargs["deadline"] == deadline
    assert again.value.timeout.total_seconds() <= deadline - time.time() + 1


def test_the_gate_decides_again_on_waking_up(gate):
    operator, context, current = gate
    current["states"] = AUTH_RELEASED
    assert operator.execute_complete(context, {"action": "go"}, deadline=time.time() + 60) is None
    current["states"] = AUTH_FAILED
    with pytest.raises(AirflowSkipException, match="not started after auth-service failed"):
        operator.execute_complete(context, {"action": "skip"}, deadline=time.time() + 60)
