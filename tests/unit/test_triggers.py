"""What the deployment and bake triggers carry across a triggerer restart, and every event each one can fire.

The hooks are replaced by fakes that answer from a script, so no test reaches AWS or needs the Airflow database.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from omnisphere_release.hooks.cloudwatch import MetricsWindow
from omnisphere_release.triggers import ecs as ecs_trigger_module
from omnisphere_release.triggers import monitoring as monitoring_trigger_module
from omnisphere_release.triggers.ecs import EcsServiceDeploymentTrigger
from omnisphere_release.triggers.monitoring import MonitoringBakeTrigger

DEPLOYMENT_ARN = "arn:aws:ecs:eu-west-1:123456789012:service-deployment/omnisphere/auth-service/abc123"
T0 = 1_760_000_000.0  # the bake's start on the fake clock


def first_event(trigger: Any) -> Any:
    """Run the trigger until its first event (a trigger that never fires fails the test instead of hanging it)."""

    async def collect() -> Any:
        async for event in trigger.run():
            return event
        raise AssertionError("the trigger ended without an event")

    async def bounded() -> Any:
        return await asyncio.wait_for(collect(), timeout=5)

    return asyncio.run(bounded())


def assert_serialize_round_trips(trigger: Any, given: dict[str, Any]) -> None:
    classpath, kwargs = trigger.serialize()
    module_name, class_name = classpath.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    assert cls is type(trigger)
    json.dumps(kwargs)  # the triggerer stores kwargs as JSON
    # A constructor argument that serialize() forgets is lost when the triggerer restarts.
    assert set(inspect.signature(cls.__init__).parameters) - {"self"} <= set(kwargs)
    assert kwargs == given
    assert cls(**kwargs).serialize() == (classpath, kwargs)


# --- EcsServiceDeploymentTrigger ------------------------------------------------------------------------------


def deployment(status: str, stage: str = "SCALE_UP", reason: str = "", weight: float = 0.0) -> dict[str, Any]:
    """Return a service deployment as DescribeServiceDeployments gives it (the fields the trigger reads)."""
    return {"serviceDeploymentArn": DEPLOYMENT_ARN, "status": status, "lifecycleStage": stage,
            "statusReason": reason,
            "targetServiceRevision": {"arn": "rev-2", "requestedTaskCount": 2, "runningTaskCount": 2,
                                      "requestedProductionTrafficWeight": weight}}


class FakeEcsHook:
    """Stands in for EcsDeploymentHook: answers describe_deployment from a script (a dict, or an exception to raise)."""

    def __init__(self, *answers: dict[str, Any] | Exception) -> None:
        self.answers = list(answers)
        self.described: list[str] = []
        self.connected_with: tuple[Any, Any] | None = None

    def __call__(self, aws_conn_id: str | None = "aws_default", region_name: str | None = None) -> FakeEcsHook:
        self.connected_with = (aws_conn_id, region_name)
        return self

    def describe_deployment(self, arn: str) -> dict[str, Any]:
        self.described.append(arn)
        if not self.answers:
            raise AssertionError("describe_deployment was called more often than the test scripted")
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def ecs_hook(monkeypatch: pytest.MonkeyPatch):
    def install(*answers: dict[str, Any] | Exception) -> FakeEcsHook:
        hook = FakeEcsHook(*answers)
        monkeypatch.setattr(ecs_trigger_module, "EcsDeploymentHook", hook)
        return hook

    return install


def ecs_trigger(deadline: float | None = None, **kwargs: Any) -> EcsServiceDeploymentTrigger:
    return EcsServiceDeploymentTrigger(DEPLOYMENT_ARN, time.time() + 60 if deadline is None else deadline,
                                       poll_seconds=0, **kwargs)


def test_ecs_trigger_serializes_every_argument():
    given = {"deployment_arn": DEPLOYMENT_ARN, "deadline": T0 + 900.5, "aws_conn_id": "aws_release",
             "region_name": "eu-west-1", "done_on_traffic_shift": True, "poll_seconds": 7.5, "settle": True,
             "read_failure_seconds": 120.0, "done_at_percent": 10.0,
             "done_at_stage": "POST_TEST_TRAFFIC_SHIFT"}
    assert_serialize_round_trips(EcsServiceDeploymentTrigger(**given), given)


def test_ecs_trigger_succeeds_when_the_deployment_succeeds(ecs_hook):
    hook = ecs_hook(deployment("PENDING"), deployment("IN_PROGRESS", "SCALE_UP"),
                    deployment("SUCCESSFUL", "CLEAN_UP", weight=100.0))

    event = first_event(ecs_trigger(aws_conn_id="aws_release", region_name="eu-west-1"))

    assert event.payload["status"] == "success"
    assert event.payload["deployment_status"] == "SUCCESSFUL"
    assert event.payload["deployment_arn"] == DEPLOYMENT_ARN
    assert event.payload["summary"].startswith("SUCCESSFUL at CLEAN_UP: 2/2 new tasks running, 100.0% of traffic")
    assert hook.described == [DEPLOYMENT_ARN] * 3
    assert hook.connected_with == ("aws_release", "eu-west-1")


@pytest.mark.parametrize("stage", ["BAKE_TIME", "CLEAN_UP"])
def test_ecs_trigger_succeeds_once_traffic_has_shifted_when_asked_to(ecs_hook, stage):
    hook = ecs_hook(deployment("IN_PROGRESS", "PRODUCTION_TRAFFIC_SHIFT", weight=50.0),
                    deployment("IN_PROGRESS", stage, weight=100.0))

    event = first_event(ecs_trigger(done_on_traffic_shift=True))

    assert event.payload["status"] == "success"
    assert event.payload["deployment_status"] == "IN_PROGRESS"
    assert event.payload["summary"].startswith(f"IN_PROGRESS at {stage}")
    assert len(hook.described) == 2  # not done while traffic was still shifting


def test_ecs_trigger_does_not_take_a_canarys_bake_for_the_end_of_the_traffic_shift(ecs_hook):
    # A canary bakes with 10 % of the traffic on the new revision: a smoke test then would mostly reach the old one.
    hook = ecs_hook(deployment("IN_PROGRESS", "BAKE_TIME", weight=10.0),
                    deployment("IN_PROGRESS", "PRODUCTION_TRAFFIC_SHIFT", weight=55.0),
                    deployment("IN_PROGRESS", "BAKE_TIME", weight=100.0))

    event = first_event(ecs_trigger(done_on_traffic_shift=True))

    assert event.payload["status"] == "success"
    assert "100.0% of traffic" in event.payload["summary"]
    assert len(hook.described) == 3


def test_ecs_trigger_says_what_it_saw_come_after_its_last_read_that_did_not_see_it(ecs_hook, monkeypatch):
    # The monitoring gate analyses a canary's first step from there: the share came after that read, by one poll at
    # most. A read that failed saw nothing, so it is not that read.
    ticks = iter(range(1000, 2000))
    monkeypatch.setattr(ecs_trigger_module.time, "time", lambda: float(next(ticks)))
    ecs_hook(deployment("IN_PROGRESS", "SCALE_UP"), ConnectionError("throttled"),
             deployment("IN_PROGRESS", "BAKE_TIME", weight=10.0))

    event = first_event(ecs_trigger(deadline=5000, done_at_percent=10.0))

    assert event.payload["status"] == "success"
    assert event.payload["after"] == 1000.0  # the first read's time, not the failed second read's


def test_ecs_trigger_that_sees_it_at_its_first_read_says_it_came_after_the_deployment_started(ecs_hook):
    started = datetime(2026, 11, 26, 23, 0, tzinfo=timezone.utc)
    ecs_hook({**deployment("IN_PROGRESS", "BAKE_TIME", weight=10.0), "startedAt": started})

    event = first_event(ecs_trigger(done_at_percent=10.0))

    assert event.payload["after"] == started.timestamp()


@pytest.mark.parametrize("stage", ["BAKE_TIME", "CLEAN_UP"])
def test_ecs_trigger_waits_for_success_after_traffic_shift_by_default(ecs_hook, stage):
    hook = ecs_hook(deployment("IN_PROGRESS", stage, weight=100.0), deployment("IN_PROGRESS", stage, weight=100.0),
                    deployment("SUCCESSFUL", "CLEAN_UP", weight=100.0))

    event = first_event(ecs_trigger())

    assert event.payload["status"] == "success"
    assert event.payload["deployment_status"] == "SUCCESSFUL"
    assert len(hook.described) == 3


@pytest.mark.parametrize(("status", "reason"), [
    ("FAILED", "ECS deployment circuit breaker: tasks failed to start."),
    ("STOPPED", "Service deployment stopped by the user."),
    ("ROLLBACK_IN_PROGRESS", "Rolling back: the alarm auth-5xx went into ALARM."),
    ("ROLLBACK_REQUESTED", "Rollback requested."),
    ("ROLLBACK_SUCCESSFUL", "Service deployment rolled back because the circuit breaker triggered."),
])
def test_ecs_trigger_fails_when_the_deployment_fails_or_rolls_back(ecs_hook, status, reason):
    ecs_hook(deployment("IN_PROGRESS"), deployment(status, "SCALE_UP", reason=reason))

    # A rollback is a failure even with done_on_traffic_shift and while ECS still counts it as in flight.
    event = first_event(ecs_trigger(done_on_traffic_shift=True))

    assert event.payload["status"] == "failed"
    assert event.payload["deployment_status"] == status
    assert event.payload["reason"] == reason
    assert event.payload["deployment_arn"] == DEPLOYMENT_ARN
    assert event.payload["summary"].startswith(f"{status} at SCALE_UP")


def test_ecs_trigger_times_out_at_its_deadline(ecs_hook):
    hook = ecs_hook(deployment("IN_PROGRESS", "SCALE_UP", weight=0.0))

    event = first_event(ecs_trigger(deadline=time.time() - 1))

    assert event.payload["status"] == "timeout"
    assert event.payload["deployment_status"] == "IN_PROGRESS"
    assert event.payload["deployment_arn"] == DEPLOYMENT_ARN
    assert event.payload["summary"].startswith("IN_PROGRESS at SCALE_UP")
    assert len(hook.described) == 1


def test_ecs_trigger_reports_the_outcome_rather_than_a_timeout_when_both_are_due(ecs_hook):
    ecs_hook(deployment("SUCCESSFUL", "CLEAN_UP"))

    assert first_event(ecs_trigger(deadline=time.time() - 1)).payload["status"] == "success"


THROTTLED = RuntimeError("describe deployment: ThrottlingException: Rate exceeded")
UNREACHABLE = RuntimeError("describe deployment: Could not connect to the endpoint URL")


def _fake_clock_in(module: Any, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Give a trigger module a clock that moves only when the trigger sleeps."""
    fake = FakeClock(T0)
    monkeypatch.setattr(module, "time", _ModuleWith(time, time=fake.time))
    monkeypatch.setattr(module, "asyncio", _ModuleWith(asyncio, sleep=fake.sleep))
    return fake


@pytest.fixture
def ecs_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The ECS trigger's clock: time moves only when it sleeps."""
    return _fake_clock_in(ecs_trigger_module, monkeypatch)


def test_ecs_trigger_rides_out_failed_reads_and_follows_the_deployment_to_its_end(ecs_hook, ecs_clock):
    # Throttled, then unreachable for a while: not reading the deployment says nothing about it.
    hook = ecs_hook(deployment("IN_PROGRESS"), THROTTLED, UNREACHABLE, UNREACHABLE, deployment("IN_PROGRESS"),
                    THROTTLED, deployment("SUCCESSFUL", "CLEAN_UP", weight=100.0))

    event = first_event(EcsServiceDeploymentTrigger(DEPLOYMENT_ARN, T0 + 600, poll_seconds=5,
                                                    read_failure_seconds=60))

    assert event.payload["status"] == "success"
    assert event.payload["deployment_status"] == "SUCCESSFUL"
    assert len(hook.described) == 7
    assert ecs_clock.slept == [5] * 6  # one poll interval after each read, failed or not


def test_ecs_trigger_gives_up_after_its_budget_of_failed_reads_so_that_the_task_may_retry(ecs_hook, ecs_clock):
    hook = ecs_hook(deployment("IN_PROGRESS"), *[UNREACHABLE] * 20)

    event = first_event(EcsServiceDeploymentTrigger(DEPLOYMENT_ARN, T0 + 600, poll_seconds=5,
                                                    read_failure_seconds=30))

    assert event.payload["status"] == "error"  # not failed: the task retries and reattaches, no rollback
    assert event.payload["deployment_arn"] == DEPLOYMENT_ARN
    assert event.payload["message"].startswith("cannot read the deployment for 30s: ")
    assert "Could not connect to the endpoint URL" in event.payload["message"]
    assert len(hook.described) == 8  # the read at T0, then failures at T0 + 5 ... T0 + 35
    assert ecs_clock.now == T0 + 35


def test_ecs_trigger_counts_the_budget_from_the_latest_outage_only(ecs_hook, ecs_clock):
    # Two outages of 20 s each, a good read in between: each is shorter than the 30 s budget.
    hook = ecs_hook(*[UNREACHABLE] * 4, deployment("IN_PROGRESS"), *[UNREACHABLE] * 4, deployment("SUCCESSFUL"))

    event = first_event(EcsServiceDeploymentTrigger(DEPLOYMENT_ARN, T0 + 600, poll_seconds=5,
                                                    read_failure_seconds=30))

    assert event.payload["status"] == "success"
    assert len(hook.described) == 10


def test_ecs_trigger_times_out_at_its_deadline_even_while_reads_fail(ecs_hook, ecs_clock):
    ecs_hook(deployment("IN_PROGRESS"), *[THROTTLED] * 20)

    event = first_event(EcsServiceDeploymentTrigger(DEPLOYMENT_ARN, T0 + 12, poll_seconds=5,
                                                    read_failure_seconds=300))

    assert event.payload["status"] == "timeout"  # the deadline is absolute, failed reads or not
    assert event.payload["deployment_status"] == "unknown"
    assert "ThrottlingException" in event.payload["summary"]
    assert ecs_clock.now == T0 + 15


@pytest.mark.parametrize("end", ["SUCCESSFUL", "STOPPED", "FAILED", "ROLLBACK_SUCCESSFUL", "ROLLBACK_FAILED"])
def test_ecs_trigger_that_settles_reports_any_end_of_the_deployment(ecs_hook, end):
    # The way back waits so for the deployment it stopped (ROLLBACK_*) or started: where the service ended is
    # judged by the next step, not by the trigger.
    hook = ecs_hook(deployment("ROLLBACK_REQUESTED"), deployment("ROLLBACK_IN_PROGRESS"),
                    deployment(end, "CLEAN_UP", reason=f"deployment is {end}"))

    event = first_event(ecs_trigger(settle=True))

    assert event.payload["status"] == "settled"
    assert event.payload["deployment_status"] == end
    assert event.payload["reason"] == f"deployment is {end}"
    assert event.payload["summary"].startswith(f"{end} at CLEAN_UP")
    assert len(hook.described) == 3  # a rollback in flight is waited for, not reported as a failure


def test_ecs_trigger_that_settles_ignores_the_traffic_shift(ecs_hook):
    hook = ecs_hook(deployment("IN_PROGRESS", "BAKE_TIME", weight=100.0), deployment("SUCCESSFUL", "CLEAN_UP"))

    event = first_event(ecs_trigger(settle=True, done_on_traffic_shift=True))

    assert event.payload["status"] == "settled"
    assert len(hook.described) == 2


def test_ecs_trigger_that_settles_times_out_at_its_deadline(ecs_hook):
    ecs_hook(deployment("ROLLBACK_IN_PROGRESS"))

    event = first_event(ecs_trigger(deadline=time.time() - 1, settle=True))

    assert event.payload["status"] == "timeout"
    assert event.payload["deployment_status"] == "ROLLBACK_IN_PROGRESS"


# --- MonitoringBakeTrigger --------------------------------------------------------------------------------------


def healthy(requests: float = 1000, errors: float = 2, p99: float | None = 0.180) -> MetricsWindow:
    return MetricsWindow(requests=requests, errors_5xx=errors, p99_seconds=p99, p99_source="p99", alarms_firing=[])


QUIET = MetricsWindow(requests=0, errors_5xx=0, p99_seconds=None, p99_source="none", alarms_firing=[])


class FakeClock:
    """The trigger's clock and sleep: time moves only when the trigger sleeps, so every poll lands on a known time."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await REAL_SLEEP(0)


REAL_SLEEP = asyncio.sleep


class _ModuleWith:
    """A module with some attributes replaced, so that only the trigger module sees the fake clock."""

    def __init__(self, module: Any, **replaced: Any) -> None:
        self._module, self._replaced = module, replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


class FakeMetricsHook:
    """Stands in for ServiceMetricsHook: answers read() from a script (a window, or an exception to raise)."""

    def __init__(self, *answers: MetricsWindow | Exception) -> None:
        self.answers = list(answers)
        self.reads: list[tuple[str, datetime, datetime, list[str]]] = []
        self.connected_with: tuple[Any, Any] | None = None

    def from_connection(self, aws_conn_id: str | None, region_name: str | None = None) -> FakeMetricsHook:
        self.connected_with = (aws_conn_id, region_name)
        return self

    def read(self, target_group: str, start: datetime, end: datetime, alarms: list[str]) -> MetricsWindow:
        self.reads.append((target_group, start, end, list(alarms)))
        if not self.answers:
            raise AssertionError("read was called more often than the test scripted")
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The monitoring trigger's clock: time moves only when it sleeps."""
    return _fake_clock_in(monitoring_trigger_module, monkeypatch)


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch, clock: FakeClock):
    def install(*answers: MetricsWindow | Exception) -> FakeMetricsHook:
        hook = FakeMetricsHook(*answers)
        monkeypatch.setattr(monitoring_trigger_module, "ServiceMetricsHook", hook)
        return hook

    return install


def bake_trigger(**overrides: Any) -> MonitoringBakeTrigger:
    """A 30 s bake from T0, polled every 10 s, with a 1 % error rate and a 1000 ms p99 as thresholds."""
    arguments: dict[str, Any] = {"target_group": "targetgroup/auth/0123456789abcdef", "started_at": T0,
                                 "bake_until": T0 + 30, "max_error_rate": 0.01, "max_p99_ms": 1000,
                                 "missing_data_seconds": 25, "alarms": ["auth-5xx", "auth-latency"],
                                 "poll_seconds": 10, "window_seconds": 15}
    return MonitoringBakeTrigger(**{**arguments, **overrides})


def test_bake_trigger_serializes_every_argument():
    given = {"target_group": "targetgroup/auth/0123456789abcdef", "started_at": T0, "bake_until": T0 + 600,
             "max_error_rate": 0.02, "max_p99_ms": 750.0, "missing_data_seconds": 90.0,
             "alarms": ["auth-5xx", "auth-latency"], "aws_conn_id": "aws_release", "region_name": "eu-west-1",
             "poll_seconds": 15.0, "window_seconds": 180.0, "allow_missing_data": True,
             "window_closes_at": T0 + 1800, "log_group": "/ecs/auth-service",
             "log_stream_prefix": "sha256-0123456789abcdef/auth/", "log_patterns": ['"ERROR"', '"Traceback"'],
             "max_error_lines": 3}
    assert_serialize_round_trips(MonitoringBakeTrigger(**given), given)


def test_bake_trigger_succeeds_after_a_healthy_bake(metrics, clock):
    hook = metrics(healthy(), healthy(), healthy(), healthy(requests=900, errors=1))

    event = first_event(bake_trigger(aws_conn_id="aws_release", region_name="eu-west-1"))

    assert event.payload["status"] == "success"
    assert len(hook.reads) == 4  # at 0, 10, 20 and 30 s
    assert clock.now == T0 + 30  # not a poll past the end of the bake
    assert event.payload["last"] == healthy(requests=900, errors=1).describe()
    assert len(event.payload["observations"]) == 4
    assert event.payload["observations"][0].endswith(healthy().describe())
    assert hook.connected_with == ("aws_release", "eu-west-1")


def test_bake_trigger_shortens_its_last_sleep_to_end_on_time(metrics, clock):
    hook = metrics(healthy(), healthy(), healthy(), healthy())

    event = first_event(bake_trigger(bake_until=T0 + 25))

    assert event.payload["status"] == "success"
    assert clock.slept == [10, 10, 5]
    assert len(hook.reads) == 4  # at 0, 10, 20 and 25 s


def test_bake_trigger_succeeds_at_once_when_the_bake_is_already_over(metrics, clock):
    hook = metrics(healthy())

    event = first_event(bake_trigger(bake_until=T0 - 1))

    assert event.payload["status"] == "success"
    assert len(hook.reads) == 1
    assert clock.slept == []


def test_bake_trigger_reads_the_last_window_but_nothing_before_the_bake(metrics, clock):
    hook = metrics(healthy(), healthy(), healthy(), healthy())

    first_event(bake_trigger(window_seconds=15))

    def utc(epoch: float) -> datetime:
        return datetime.fromtimestamp(epoch, timezone.utc)

    starts = [start for _, start, _, _ in hook.reads]
    assert starts == [utc(T0), utc(T0), utc(T0 + 5), utc(T0 + 15)]
    # CloudWatch's datapoints are per minute: the end reaches past now so that the current minute is included.
    assert [end for _, _, end, _ in hook.reads] == [utc(T0 + s) + timedelta(seconds=60) for s in (0, 10, 20, 30)]
    assert {(target, tuple(alarms)) for target, _, _, alarms in hook.reads} == {
        ("targetgroup/auth/0123456789abcdef", ("auth-5xx", "auth-latency"))}


def test_bake_trigger_breaches_on_the_5xx_rate(metrics):
    metrics(healthy(), healthy(requests=1000, errors=50))

    event = first_event(bake_trigger())

    assert event.payload["status"] == "breach"
    reason = event.payload["reason"]
    assert reason.startswith("5xx error rate 5.00% (50 of 1000 requests)")
    assert "above the 1.00% threshold" in reason
    assert len(event.payload["observations"]) == 2
    assert event.payload["observations"][-1].endswith(healthy(requests=1000, errors=50).describe())


def test_bake_trigger_tolerates_a_5xx_rate_at_the_threshold(metrics):
    metrics(healthy(requests=1000, errors=10), healthy(requests=1000, errors=10), healthy(requests=1000, errors=10),
            healthy(requests=1000, errors=10))

    assert first_event(bake_trigger()).payload["status"] == "success"


@pytest.mark.parametrize(("source", "expected"), [("p99", "1500 ms (p99)"), ("Maximum", "1500 ms (Maximum)")])
def test_bake_trigger_breaches_on_p99_latency(metrics, source, expected):
    metrics(MetricsWindow(requests=1000, errors_5xx=0, p99_seconds=1.5, p99_source=source, alarms_firing=[]))

    event = first_event(bake_trigger())

    assert event.payload["status"] == "breach"
    assert event.payload["reason"] == f"p99 latency {expected} is above the 1000 ms threshold"
    assert len(event.payload["observations"]) == 1


def test_bake_trigger_breaches_when_an_alarm_fires(metrics):
    firing = MetricsWindow(requests=1000, errors_5xx=0, p99_seconds=0.1, p99_source="p99",
                           alarms_firing=["auth-latency"])
    metrics(healthy(), healthy(), firing)

    event = first_event(bake_trigger())

    assert event.payload["status"] == "breach"
    assert event.payload["reason"] == "alarm(s) firing: auth-latency"
    assert len(event.payload["observations"]) == 3
    assert "alarms firing: auth-latency" in event.payload["observations"][-1]


def test_bake_trigger_reports_no_data_when_no_request_is_seen_for_too_long(metrics, clock):
    metrics(QUIET, QUIET, QUIET, QUIET)

    event = first_event(bake_trigger(bake_until=T0 + 300, missing_data_seconds=25))

    assert event.payload["status"] == "no_data"
    assert clock.now == T0 + 30  # the first poll more than 25 s after the bake started
    assert event.payload["reason"].startswith("no requests seen for 30s (limit 25s)")
    assert len(event.payload["observations"]) == 4


def test_bake_trigger_counts_missing_data_from_the_last_request_seen(metrics, clock):
    metrics(QUIET, QUIET, healthy(), QUIET, QUIET, QUIET)

    event = first_event(bake_trigger(bake_until=T0 + 300, missing_data_seconds=25))

    assert event.payload["status"] == "no_data"
    assert clock.now == T0 + 50  # 30 s after the requests seen at T0 + 20
    assert event.payload["reason"].startswith("no requests seen for 30s (limit 25s)")
    assert len(event.payload["observations"]) == 6


def test_bake_trigger_accepts_missing_data_when_allowed(metrics, clock):
    metrics(*[QUIET] * 7)

    event = first_event(bake_trigger(bake_until=T0 + 60, missing_data_seconds=25, allow_missing_data=True))

    assert event.payload["status"] == "success"
    assert clock.now == T0 + 60
    assert len(event.payload["observations"]) == 7


def test_bake_trigger_fails_when_the_window_has_closed(metrics):
    hook = metrics(healthy())

    event = first_event(bake_trigger(window_closes_at=T0 - 1))

    assert event.payload["status"] == "window_closed"
    assert "maintenance window closed" in event.payload["reason"]
    assert len(event.payload["observations"]) == 1
    assert len(hook.reads) == 1


def test_bake_trigger_fails_when_the_window_closes_during_the_bake(metrics, clock):
    metrics(healthy(), healthy(), healthy())

    event = first_event(bake_trigger(window_closes_at=T0 + 15))

    assert event.payload["status"] == "window_closed"
    assert clock.now == T0 + 20


CLOUDWATCH_DOWN = RuntimeError("Could not connect to the endpoint URL: \"http://127.0.0.1:4566/\"")


def test_bake_trigger_survives_a_cloudwatch_outage_shorter_than_missing_data(metrics, clock):
    # 20 s without CloudWatch in a 60 s bake whose missing-data limit is 25 s.
    hook = metrics(healthy(), CLOUDWATCH_DOWN, CLOUDWATCH_DOWN, healthy(), healthy(), healthy(), healthy())

    event = first_event(bake_trigger(bake_until=T0 + 60, missing_data_seconds=25))

    assert event.payload["status"] == "success"
    assert clock.now == T0 + 60
    assert len(event.payload["observations"]) == 5  # the failed reads observed nothing

    def utc(epoch: float) -> datetime:
        return datetime.fromtimestamp(epoch, timezone.utc)

    # The first reading after the outage looks back over it: a breach while CloudWatch was away still counts.
    # (failing since T0 + 10: from 15 s before that, but not before the bake); the next reading is back to normal.
    starts = [start for _, start, _, _ in hook.reads]
    assert starts[3] == utc(T0)
    assert starts[4] == utc(T0 + 40 - 15)


def test_bake_trigger_looks_back_over_the_outage_and_breaches_on_what_happened_then(metrics, clock):
    hook = metrics(healthy(), CLOUDWATCH_DOWN, CLOUDWATCH_DOWN, CLOUDWATCH_DOWN, healthy(requests=1000, errors=50))

    event = first_event(bake_trigger(bake_until=T0 + 120, missing_data_seconds=60, window_seconds=15))

    assert event.payload["status"] == "breach"
    assert clock.now == T0 + 40
    _, start, end, _ = hook.reads[-1]
    assert start == datetime.fromtimestamp(T0, timezone.utc)  # not T0 + 25: the outage is looked at too
    assert end == datetime.fromtimestamp(T0 + 40, timezone.utc) + timedelta(seconds=60)


def test_bake_trigger_fails_when_cloudwatch_stays_unreadable_longer_than_missing_data(metrics, clock):
    metrics(healthy(), *[CLOUDWATCH_DOWN] * 10)

    event = first_event(bake_trigger(bake_until=T0 + 300, missing_data_seconds=25))

    assert event.payload["status"] == "unreadable"  # a failure: the release rolls back
    assert clock.now == T0 + 40  # failing since T0 + 10; the first failed read 25 s or more after that
    reason = event.payload["reason"]
    assert reason.startswith("CloudWatch could not be read for 30s (limit 25s, the catalog's "
                             "monitoring.missing_data_minutes): Could not connect to the endpoint URL")
    assert reason.endswith("treated as a failure")
    assert len(event.payload["observations"]) == 1


def test_bake_trigger_does_not_end_a_bake_it_could_not_watch_to_the_end(metrics, clock):
    # CloudWatch goes away just before the bake ends: the bake is not over until a reading covers its end.
    metrics(healthy(), healthy(), CLOUDWATCH_DOWN, CLOUDWATCH_DOWN, healthy())

    event = first_event(bake_trigger(bake_until=T0 + 20, missing_data_seconds=25))

    assert event.payload["status"] == "success"
    assert clock.now == T0 + 40
    assert clock.slept == [10, 10, 10, 10]  # polls go on at the usual pace after the bake's end, not in a busy loop


def test_bake_trigger_gives_up_at_bake_end_plus_missing_data_even_after_a_restart(metrics, clock):
    # A triggerer restarted at T0 + 50 forgets when the outage began; the absolute limit still holds.
    metrics(*[CLOUDWATCH_DOWN] * 10)
    clock.now = T0 + 50

    event = first_event(bake_trigger(bake_until=T0 + 30, missing_data_seconds=25))

    assert event.payload["status"] == "unreadable"
    assert clock.now == T0 + 55  # bake_until + missing_data_seconds


# --- a step's analysis: the new task set against the old one ------------------------------------------------------
from omnisphere_release.triggers.monitoring import step_breach  # noqa: E402 - grouped with its tests


def window(requests: float, errors: float, p99: float | None, alarms: list[str] | None = None) -> MetricsWindow:
    return MetricsWindow(requests, errors, p99, "p99", alarms or [])


@pytest.mark.parametrize(("new", "old", "expected"), [
    (window(100, 0, 0.05), window(900, 0, 0.05), None),
    (window(0, 0, None), window(900, 0, 0.05), None),  # no data yet: the no-data policy judges it, not this
    (window(100, 25, 0.05), window(900, 0, 0.05), "new task set's 5xx error rate 25.00% (25 of 100 requests) is "
                                                  "above the 2.00% threshold (old task set: 900 requests"),
    (window(100, 1, 1.2), window(900, 0, 0.05), "new task set's p99 latency 1200 ms (p99) is above the 800 ms"),
    (window(400, 6, 0.05), window(900, 0, 0.05), "new task set's 5xx error rate 1.50% is more than 1.00% above the "
                                                 "old task set's 0.00%"),
    (window(400, 6, 0.05), window(900, 9, 0.05), None),  # as bad as the old one: not the release's doing
    (window(100, 0, 0.5), window(900, 0, 0.2), "new task set's p99 latency 500 ms is over 1.5 times the old task "
                                               "set's 200 ms"),
    (window(100, 0, 0.05, ["auth-5xx"]), None, "alarm(s) firing: auth-5xx"),
    (window(100, 1, 0.05), None, None),  # at 100 %: the thresholds alone
])
def test_a_step_fails_on_the_thresholds_or_when_clearly_worse_than_the_old_task_set(new, old, expected):
    breach = step_breach(new, old, max_error_rate=0.02, max_p99_ms=800)
    if expected is None:
        assert breach is None
    else:
        assert breach is not None and breach.startswith(expected), breach


# --- DeploymentStepsTrigger: a canary or linear deployment followed step by step ---------------------------------
from omnisphere_release.triggers.monitoring import DeploymentStepsTrigger  # noqa: E402 - grouped with its tests

NEW_TG, OLD_TG = "targetgroup/auth-green/fedcba9876543210", "targetgroup/auth/0123456789abcdef"


def steps_trigger(**overrides: Any) -> DeploymentStepsTrigger:
    """A canary 10 % -> 100 % with a 2 % error rate and an 800 ms p99 as thresholds, polled every 5 s."""
    arguments: dict[str, Any] = {
        "deployment_arn": DEPLOYMENT_ARN, "steps": [{"percent": 10.0, "bake_minutes": 1},
                                                    {"percent": 100.0, "bake_minutes": 1}],
        "production_target_group": OLD_TG, "new_target_group": NEW_TG, "max_error_rate": 0.02, "max_p99_ms": 800,
        "missing_data_seconds": 60, "deadline": T0 + 3600, "poll_seconds": 5}
    return DeploymentStepsTrigger(**{**arguments, **overrides})


@pytest.fixture
def stepped(monkeypatch: pytest.MonkeyPatch, clock: FakeClock, metrics: Any):
    """Script the deployment (ECS) and the target groups' readings (CloudWatch) the steps trigger sees."""
    def install(deployments: list[dict[str, Any]], windows: list[MetricsWindow]) -> tuple[FakeEcsHook, Any]:
        ecs = FakeEcsHook(*deployments)
        monkeypatch.setattr(monitoring_trigger_module, "EcsDeploymentHook", ecs)
        return ecs, metrics(*windows)

    return install


def test_steps_trigger_serializes_every_argument():
    given = {"deployment_arn": DEPLOYMENT_ARN, "steps": [{"percent": 25.0, "bake_minutes": 2}],
             "production_target_group": OLD_TG, "new_target_group": NEW_TG, "max_error_rate": 0.02,
             "max_p99_ms": 800, "missing_data_seconds": 60, "deadline": T0 + 900, "alarms": ["auth-5xx"],
             "aws_conn_id": "aws_release", "region_name": "eu-west-1", "poll_seconds": 5.0,
             "window_closes_at": T0 + 1800, "log_group": "/ecs/auth-service", "log_stream_prefix": "sha256-ab/auth/",
             "log_patterns": ['"ERROR"'], "max_error_lines": 0, "late_bake_seconds": 300.0,
             "first_share_after": T0 - 30}
    assert_serialize_round_trips(DeploymentStepsTrigger(**given), given)


def test_a_canary_passes_step_by_step_comparing_the_new_task_set_with_the_old_one(stepped, clock):
    ecs, cw = stepped(
        [deployment("IN_PROGRESS", "BAKE_TIME", weight=10.0), deployment("IN_PROGRESS", "BAKE_TIME", weight=10.0),
         deployment("IN_PROGRESS", "BAKE_TIME", weight=100.0), deployment("IN_PROGRESS", "CLEAN_UP", weight=100.0)],
        [healthy(100, 0, 0.05), healthy(900, 0, 0.05), healthy(100, 1, 0.05), healthy(900, 2, 0.05),
         healthy(1000, 3, 0.06)])

    event = first_event(steps_trigger())

    assert event.payload["status"] == "success", event.payload
    assert [(s["percent"], s["verdict"]) for s in event.payload["steps"]] == [(10.0, "passed"), (100.0, "passed")]
    assert event.payload["steps"][0]["ended_at"] == event.payload["steps"][1]["started_at"] == T0 + 10
    # During 10 %: the new task set's group, then the old one's; at 100 %: the production group alone.
    assert [read[0] for read in cw.reads] == [NEW_TG, OLD_TG, NEW_TG, OLD_TG, OLD_TG]


def test_a_step_that_breaches_ends_the_analysis_naming_the_step_before_the_next_one(stepped):
    _, cw = stepped([deployment("IN_PROGRESS", "BAKE_TIME", weight=10.0)],
                    [healthy(120, 30, 0.05), healthy(1080, 1, 0.05)])

    event = first_event(steps_trigger())

    assert event.payload["status"] == "breach"
    assert event.payload["failed_step"] == 10.0
    assert event.payload["reason"].startswith("step 10 %: new task set's 5xx error rate 25.00% (30 of 120 requests)")
    assert [(s["percent"], s["verdict"]) for s in event.payload["steps"]] == [(10.0, "failed")]


def test_a_step_in_which_the_new_task_set_serves_nothing_fails_after_the_no_data_limit(stepped, clock):
    stepped([deployment("IN_PROGRESS", "BAKE_TIME", weight=10.0)] * 14, [QUIET, healthy()] * 14)

    event = first_event(steps_trigger(missing_data_seconds=60))

    assert event.payload["status"] == "breach"
    assert "no requests seen on the new task set for 65s (limit 60s)" in event.payload["reason"]
    assert clock.now == T0 + 65


def test_a_deployment_ecs_ends_by_itself_ends_the_analysis_with_its_status(stepped):
    stepped([deployment("IN_PROGRESS", "BAKE_TIME", weight=10.0),
             deployment("ROLLBACK_IN_PROGRESS", "BAKE_TIME", reason="circuit breaker", weight=0.0)],
            [healthy(100, 0, 0.05), healthy(900, 0, 0.05)])

    event = first_event(steps_trigger())

    assert event.payload["status"] == "deployment_ended"
    assert event.payload["deployment_status"] == "ROLLBACK_IN_PROGRESS"
    assert [(s["percent"], s["verdict"]) for s in event.payload["steps"]] == [(10.0, "stopped")]


# ECS bakes the steps on its own clock from ecs_deploy's end; smoke_test, regression_test and the scheduler's hand-offs
# come before the gate. Under a live scheduler the catalog's short devstack steps were all over before the trigger's
# first look, and it ended the gate with "ECS ended the deployment SUCCESSFUL during the steps": a clean canary
# rolled back.
def test_a_deployment_ecs_completed_before_the_gate_looked_is_baked_at_100_percent_not_rolled_back(stepped, clock):
    done = deployment("SUCCESSFUL", "CLEAN_UP", reason="completed", weight=100.0)
    _, cw = stepped([done] * 4, [healthy(1000, 1, 0.05)] * 4)

    event = first_event(steps_trigger(late_bake_seconds=12))

    assert event.payload["status"] == "success", event.payload
    assert clock.now == T0 + 12  # the release's bake at 100 %, polled every 5 s, the last poll at its end
    assert [(s["percent"], s["verdict"]) for s in event.payload["steps"]] == [(100.0, "passed")]
    assert [read[0] for read in cw.reads] == [OLD_TG] * 4  # the production target group: the new revision alone
    assert "ECS completed the deployment before step(s) 10 %, 100 % were seen" in event.payload["observations"][0]


def test_the_late_bake_at_100_percent_still_fails_on_a_breach(stepped, clock):
    done = deployment("SUCCESSFUL", "CLEAN_UP", weight=100.0)
    stepped([done] * 2, [healthy(1000, 1, 0.05), healthy(1000, 300, 0.05)])

    event = first_event(steps_trigger(late_bake_seconds=60))

    assert event.payload["status"] == "breach"
    assert event.payload["failed_step"] == 100.0
    assert event.payload["reason"].startswith("step 100 %: new task set's 5xx error rate 30.00%")
    assert clock.now == T0 + 5


def test_a_deployment_completed_between_two_polls_passes_the_step_seen_and_bakes_the_rest(stepped, clock):
    stepped([deployment("IN_PROGRESS", "BAKE_TIME", weight=10.0),
             deployment("SUCCESSFUL", "CLEAN_UP", weight=100.0), deployment("SUCCESSFUL", "CLEAN_UP", weight=100.0)],
            [healthy(100, 0, 0.05), healthy(900, 0, 0.05), healthy(1000, 1, 0.05), healthy(1000, 1, 0.05)])

    event = first_event(steps_trigger(late_bake_seconds=5))

    assert event.payload["status"] == "success", event.payload
    assert [(s["percent"], s["verdict"]) for s in event.payload["steps"]] == [(10.0, "passed"), (100.0, "passed")]
    assert clock.now == T0 + 10


def test_a_deployment_that_ends_otherwise_still_ends_the_analysis(stepped):
    stepped([deployment("ROLLBACK_SUCCESSFUL", "CLEAN_UP", reason="stopped", weight=0.0)], [])

    event = first_event(steps_trigger(late_bake_seconds=60))

    assert event.payload["status"] == "deployment_ended"
    assert event.payload["steps"] == []


# The first step bakes from when ecs_deploy saw it; smoke_test and regression_test come before the gate. What users
# saw in that time counts: the first step is read from then, and steps ECS baked before the first look are judged
# after the fact on what CloudWatch kept, not waved through.
def test_the_first_step_is_analysed_from_when_ecs_deploy_saw_it_not_from_the_gates_first_look(stepped, clock):
    _, cw = stepped([deployment("IN_PROGRESS", "BAKE_TIME", weight=10.0)],
                    [healthy(120, 30, 0.05), healthy(1080, 1, 0.05)])

    event = first_event(steps_trigger(first_share_after=T0 - 40))

    assert event.payload["status"] == "breach" and event.payload["failed_step"] == 10.0
    assert event.payload["steps"][0]["started_at"] == T0 - 40
    assert [(group, start) for group, start, _, _ in cw.reads] == [
        (NEW_TG, datetime.fromtimestamp(T0 - 40, timezone.utc)), (OLD_TG, datetime.fromtimestamp(T0 - 40, timezone.utc))]


def test_a_step_ecs_baked_before_the_gate_looked_is_judged_after_the_fact_and_fails_the_gate(stepped, clock):
    # The canary erred at 10 % while regression_test ran; ECS has moved on to 100 % by the gate's first look.
    _, cw = stepped([deployment("IN_PROGRESS", "BAKE_TIME", weight=100.0)], [healthy(400, 100, 0.05)])

    event = first_event(steps_trigger(first_share_after=T0 - 90))

    assert event.payload["status"] == "breach"
    assert event.payload["failed_step"] == 10.0  # the gate stops the deployment with ROLLBACK at once
    assert event.payload["reason"].startswith("step 10 % (judged after ECS baked it, from ")
    assert "new task set's 5xx error rate 25.00% (100 of 400 requests)" in event.payload["reason"]
    assert event.payload["steps"] == [{"percent": 10.0, "started_at": T0 - 90, "ended_at": T0, "verdict": "failed"}]
    [(group, start, end, _)] = cw.reads  # the new task set's group, from the first share to the first look
    assert (group, start) == (NEW_TG, datetime.fromtimestamp(T0 - 90, timezone.utc))
    assert end == datetime.fromtimestamp(T0, timezone.utc) + timedelta(seconds=60)


def test_steps_that_passed_before_the_gate_looked_are_recorded_and_the_rest_analysed_as_they_bake(stepped, clock):
    stepped([deployment("IN_PROGRESS", "BAKE_TIME", weight=100.0), deployment("IN_PROGRESS", "CLEAN_UP", weight=100.0)],
            [healthy(400, 1, 0.05), healthy(1000, 1, 0.05)])

    event = first_event(steps_trigger(first_share_after=T0 - 90))

    assert event.payload["status"] == "success", event.payload
    assert [(s["percent"], s["verdict"], s["started_at"]) for s in event.payload["steps"]] == [
        (10.0, "passed", T0 - 90), (100.0, "passed", T0)]
    assert "judged after the fact" in event.payload["observations"][0]


def test_a_deployment_completed_before_the_gate_looked_fails_on_what_its_missed_steps_showed(stepped, clock):
    # Before, a completed deployment was baked at 100 % only: a canary that erred at 10 % and then completed passed.
    done = deployment("SUCCESSFUL", "CLEAN_UP", weight=100.0)
    stepped([done] * 3, [healthy(400, 100, 0.05)] + [healthy(1000, 1, 0.05)] * 2)

    event = first_event(steps_trigger(first_share_after=T0 - 120, late_bake_seconds=30))

    assert event.payload["status"] == "breach", event.payload
    assert event.payload["failed_step"] == 10.0 and clock.now == T0  # at the first look, no late bake first


def test_a_deployment_completed_before_the_gate_looked_is_judged_then_baked_at_100_percent(stepped, clock):
    done = deployment("SUCCESSFUL", "CLEAN_UP", weight=100.0)
    _, cw = stepped([done] * 4, [healthy(400, 1, 0.05)] + [healthy(1000, 1, 0.05)] * 3)

    event = first_event(steps_trigger(first_share_after=T0 - 120, late_bake_seconds=10))

    assert event.payload["status"] == "success", event.payload
    assert [(s["percent"], s["verdict"]) for s in event.payload["steps"]] == [(10.0, "passed"), (100.0, "passed")]
    assert [read[0] for read in cw.reads] == [NEW_TG, OLD_TG, OLD_TG, OLD_TG]
    assert clock.now == T0 + 10
