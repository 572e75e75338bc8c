"""Watch a service's metrics, alarms and new tasks' error log lines for the bake period; fire as soon as a threshold
is breached, with what the bake recorded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async

from omnisphere_release.hooks.cloudwatch import LogScan, MinuteReading, ServiceLogsHook, ServiceMetricsHook
from omnisphere_release.hooks.ecs import IN_FLIGHT, EcsDeploymentHook, summarize, traffic_weight

WARN_EVERY_SECONDS = 30.0
SAMPLE_LINES = 5  # error lines quoted in the gate's log and kept in the bake record


def log_breach(scan: LogScan, max_error_lines: int, log_group: str, prefix: str, patterns: list[str]) -> str | None:
    """Return why the new task set's error lines fail the bake, or None when there are no more than allowed."""
    if scan.count <= max_error_lines:
        return None
    quoted = " | ".join(scan.samples)
    return (f"{scan.describe()} of the new task set ({log_group}, streams {prefix}*) match the error patterns "
            f"{', '.join(patterns)}: more than the {max_error_lines} allowed (monitoring.logs.max_error_lines); "
            f"first lines: {quoted}")


def merge_minutes(readings: dict[str, dict[str, Any]], minutes: tuple[MinuteReading, ...]) -> None:
    """Keep, for each minute, the fullest reading of it: a later read of a minute holds at least as many requests
    (CloudWatch fills a minute as it goes) unless its window started inside that minute, and then it holds fewer."""
    for reading in minutes:
        known = readings.get(reading.minute)
        if known is None or reading.requests >= known["requests"]:
            readings[reading.minute] = reading.to_dict()


def copied_list(values: Iterable[str] | None) -> list[str]:
    """None reads as none at all; a copy, so that the caller changing its list later cannot change a deferred wait."""
    return list(values or [])


def copied_steps(steps: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A copy of each step, for the same reason."""
    return [dict(step) for step in steps]


# Each field of the triggers below is at once a constructor argument (with its default and its conversion) and a
# serialized kwarg of the same name: declared once, so that the trigger the operator defers with is the one the
# triggerer rebuilds from the stored row, and a new field cannot be left out of serialize(). The same attrs.define
# arguments on each class (written out, as mypy's attrs plugin reads only a literal attrs.define): keyword-only,
# because a trigger's own fields and the shared ones do not come in one order; eq and repr stay BaseTrigger's
# (identity, and the serialized form); no slots, as BaseTrigger's instances keep a __dict__.
@attrs.define(kw_only=True, eq=False, repr=False, slots=False)
class WatchTrigger(BaseTrigger):
    """What the bake and the stepped bake share: thresholds, alarms, AWS connection, polling, maintenance window and
    the new task set's log check. A subclass declares its own fields, decorated the same way, and implements ``run``.
    """

    max_error_rate: float
    max_p99_ms: float
    missing_data_seconds: float
    alarms: list[str] = attrs.field(factory=list, converter=copied_list)
    aws_conn_id: str | None = "aws_default"
    region_name: str | None = None
    poll_seconds: float = 10.0
    window_closes_at: float | None = None
    log_group: str | None = None
    log_stream_prefix: str | None = None
    log_patterns: list[str] = attrs.field(factory=list, converter=copied_list)
    max_error_lines: int = 0

    def __attrs_pre_init__(self) -> None:
        super().__init__()  # BaseTrigger's own state (trigger_id, task_instance...), before the fields are set

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {field.name: getattr(self, field.name) for field in attrs.fields(type(self))})

    @property
    def checks_logs(self) -> bool:
        return bool(self.log_group and self.log_stream_prefix and self.log_patterns)

    def _log_breach(self, scan: LogScan) -> str | None:
        return log_breach(scan, self.max_error_lines, self.log_group or "", self.log_stream_prefix or "",
                          self.log_patterns)


@attrs.define(kw_only=True, eq=False, repr=False, slots=False)
class MonitoringBakeTrigger(WatchTrigger):
    """Every ``poll_seconds`` until ``bake_until`` (epoch seconds), read the metrics of the last ``window_seconds``.

    Fails on an error rate or p99 latency above the thresholds, on a firing alarm, and, unless ``allow_missing_data``,
    when no request was seen for ``missing_data_seconds``. ``window_closes_at`` (epoch seconds, optional) fails the
    gate if the maintenance window closes before the bake ends.

    A failed read (after the AWS client's own retries) is tried again at the next poll: an outage shorter than
    ``missing_data_seconds`` is survived, and the next reading looks back over it. One that lasts longer, or that
    lasts past ``bake_until + missing_data_seconds`` (absolute, so a triggerer restart does not extend it), ends the
    bake as a failure (``unreadable``) saying for how long CloudWatch could not be read.

    With a ``log_group``, ``log_stream_prefix`` (the new task set's streams) and ``log_patterns`` (CloudWatch Logs
    filter patterns), each poll also counts the error lines those streams logged since the bake began: more than
    ``max_error_lines`` fails the bake, quoting the first few. No such stream for ``missing_data_seconds`` is no data.
    Every event carries the per-minute ``readings`` and the ``log_errors`` seen so far, whatever the outcome.
    """

    target_group: str
    started_at: float
    bake_until: float
    window_seconds: float = 120.0
    allow_missing_data: bool = False

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = await sync_to_async(ServiceMetricsHook.from_connection)(self.aws_conn_id, self.region_name)
        logs = (await sync_to_async(ServiceLogsHook.from_connection)(self.aws_conn_id, self.region_name)
                if self.checks_logs else None)
        last_data = self.started_at  # the clock for "no data" starts with the bake
        last_log_stream = self.started_at  # likewise for "no log stream of the new task set"
        failing_since: float | None = None  # when CloudWatch stopped answering, if it has
        warned_at = 0.0
        # Absolute, from serialized times: a triggerer restart during an outage cannot stretch it.
        give_up_at = self.bake_until + self.missing_data_seconds
        observations: list[str] = []
        readings: dict[str, dict[str, Any]] = {}  # minute -> the fullest reading of it
        scan: LogScan | None = None

        def event(status: str, **fields: Any) -> TriggerEvent:
            """Every event carries what the bake recorded, whatever its outcome (the Releases page charts it)."""
            return TriggerEvent({"status": status, "observations": observations, "started_at": self.started_at,
                                 "ended_at": time.time(),
                                 "readings": [readings[m] for m in sorted(readings)],
                                 "log_errors": None if scan is None else {
                                     "count": scan.count, "samples": scan.samples, "streams": scan.streams},
                                 **fields})

        while True:
            now = time.time()
            # After an outage, look back over it too: a breach while CloudWatch could not be read still counts.
            since = now if failing_since is None else failing_since
            start = datetime.fromtimestamp(max(self.started_at, since - self.window_seconds), timezone.utc)
            end = datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=60)
            try:
                window = await asyncio.to_thread(hook.read, self.target_group, start, end, self.alarms)
                if logs is not None and self.log_group and self.log_stream_prefix:
                    # The whole bake each time: late-ingested lines count, and the count is the bake's, not a poll's.
                    scan = await asyncio.to_thread(
                        logs.error_lines, self.log_group, self.log_stream_prefix, self.log_patterns,
                        datetime.fromtimestamp(self.started_at, timezone.utc), end, SAMPLE_LINES)
            except Exception as exc:  # noqa: BLE001 - an unreadable CloudWatch is tried again, within the budget
                failing_since = now if failing_since is None else failing_since
                unread = now - failing_since
                if unread >= self.missing_data_seconds or now >= give_up_at:
                    yield event("unreadable", reason=f"CloudWatch could not be read for {unread:.0f}s (limit "
                                                     f"{self.missing_data_seconds:.0f}s, the catalog's "
                                                     f"monitoring.missing_data_minutes): {exc}; a bake nobody could "
                                                     f"watch proves nothing, treated as a failure")
                    return
                if now - warned_at >= WARN_EVERY_SECONDS:  # one line per outage and half minute, not per poll
                    self.log.warning("Bake %.0f/%.0fs: cannot read CloudWatch for %.0fs: %s; trying again every "
                                     "%.0fs (a failure after %.0fs).", now - self.started_at,
                                     self.bake_until - self.started_at, unread, exc, self.poll_seconds,
                                     self.missing_data_seconds)
                    warned_at = now
                if self.window_closes_at is not None and now >= self.window_closes_at:
                    yield event("window_closed", reason="the maintenance window closed during the bake")
                    return
                await asyncio.sleep(max(0.1, min(self.poll_seconds, give_up_at - now)))
                continue
            if failing_since is not None:
                self.log.info("CloudWatch readable again after %.0fs; this reading covers the outage.",
                              now - failing_since)
                failing_since = None
            merge_minutes(readings, window.minutes)
            line = window.describe() + (f"; {scan.describe()}" if scan is not None else "")
            observations.append(f"{datetime.fromtimestamp(now, timezone.utc):%H:%M:%S} {line}")
            self.log.info("Bake %.0f/%.0fs: %s", now - self.started_at, self.bake_until - self.started_at, line)
            breach = self._breach(window) or (self._log_breach(scan) if scan is not None else None)
            if breach:
                yield event("breach", reason=breach)
                return
            if window.has_data:
                last_data = now
            elif not self.allow_missing_data and now - last_data > self.missing_data_seconds:
                yield event("no_data", reason=f"no requests seen for {now - last_data:.0f}s (limit "
                                              f"{self.missing_data_seconds:.0f}s): the service may be down or "
                                              f"unobserved; treated as a failure")
                return
            if scan is not None and scan.streams:
                last_log_stream = now
            elif scan is not None and not self.allow_missing_data and now - last_log_stream > self.missing_data_seconds:
                yield event("no_data", reason=f"no log stream {self.log_stream_prefix}* in log group {self.log_group} "
                                              f"for {now - last_log_stream:.0f}s (limit "
                                              f"{self.missing_data_seconds:.0f}s): the new tasks' logs are not "
                                              f"reaching CloudWatch Logs, so nobody can tell whether they log "
                                              f"errors; treated as a failure")
                return
            if self.window_closes_at is not None and now >= self.window_closes_at:
                yield event("window_closed", reason="the maintenance window closed during the bake")
                return
            if now >= self.bake_until:
                yield event("success", last=line)
                return
            await asyncio.sleep(min(self.poll_seconds, max(0.1, self.bake_until - now)))

    def _breach(self, window: Any) -> str | None:
        if window.alarms_firing:
            return f"alarm(s) firing: {', '.join(window.alarms_firing)}"
        if window.has_data and window.error_rate > self.max_error_rate:
            return (f"5xx error rate {window.error_rate:.2%} ({window.errors_5xx:.0f} of {window.requests:.0f} "
                    f"requests) is above the {self.max_error_rate:.2%} threshold")
        if window.p99_seconds is not None and window.p99_seconds * 1000 > self.max_p99_ms:
            return (f"p99 latency {window.p99_seconds * 1000:.0f} ms ({window.p99_source}) is above the "
                    f"{self.max_p99_ms:.0f} ms threshold")
        return None


# How much worse than the old task set the new one may be, on top of the catalog's absolute thresholds: a p99 over
# P99_RATIO times the old one's (plus P99_NOISE_SECONDS, so that a few ms of jitter on a fast service is not a
# failure), or a 5xx rate more than half the catalog's max_error_rate above the old one's, with at least
# MIN_ERRORS_TO_COMPARE errors (a single error among a handful of canary requests proves nothing).
P99_RATIO = 1.5
P99_NOISE_SECONDS = 0.1
MIN_ERRORS_TO_COMPARE = 5


def step_breach(new: Any, old: Any, max_error_rate: float, max_p99_ms: float) -> str | None:
    """Return why the new task set fails its step against the thresholds and the old task set, or None.

    ``new`` and ``old`` are MetricsWindow readings of the two target groups over the step so far (``old`` None at
    100 %, when no old task set takes traffic)."""
    if new.alarms_firing:
        return f"alarm(s) firing: {', '.join(new.alarms_firing)}"
    baseline = "" if old is None else f" (old task set: {old.describe()})"
    if new.has_data and new.error_rate > max_error_rate:
        return (f"new task set's 5xx error rate {new.error_rate:.2%} ({new.errors_5xx:.0f} of {new.requests:.0f} "
                f"requests) is above the {max_error_rate:.2%} threshold{baseline}")
    if new.p99_seconds is not None and new.p99_seconds * 1000 > max_p99_ms:
        return (f"new task set's p99 latency {new.p99_seconds * 1000:.0f} ms ({new.p99_source}) is above the "
                f"{max_p99_ms:.0f} ms threshold{baseline}")
    if old is None or not old.has_data or not new.has_data:
        return None
    if new.errors_5xx >= MIN_ERRORS_TO_COMPARE and new.error_rate > old.error_rate + max_error_rate / 2:
        return (f"new task set's 5xx error rate {new.error_rate:.2%} is more than {max_error_rate / 2:.2%} above the "
                f"old task set's {old.error_rate:.2%}{baseline}")
    if (new.p99_seconds is not None and old.p99_seconds is not None
            and new.p99_seconds > old.p99_seconds * P99_RATIO + P99_NOISE_SECONDS):
        return (f"new task set's p99 latency {new.p99_seconds * 1000:.0f} ms is over {P99_RATIO:g} times the old "
                f"task set's {old.p99_seconds * 1000:.0f} ms (+{P99_NOISE_SECONDS * 1000:.0f} ms){baseline}")
    return None


@attrs.define(kw_only=True, eq=False, repr=False, slots=False)
class DeploymentStepsTrigger(WatchTrigger):
    """Follow a canary or linear ECS deployment step by step, and analyse each step while ECS bakes it.

    A step begins when ECS reports a new share of production traffic on the new revision
    (``requestedProductionTrafficWeight``) and ends when it reports the next one; the last (100 %) ends when ECS
    leaves its bake (CLEAN_UP, or the deployment done). During a step, every ``poll_seconds``, the new task set's
    target group (``new_target_group``) is read against the old one's (``old_target_group``) since the step began
    (:func:`step_breach`), the catalog's alarms are read, and, with ``log_group``, the new task set's streams are
    searched for error lines since the first step. At 100 % the production target group is the new task set's.

    No-data policy: a step in which the new task set served no request for ``missing_data_seconds`` fails (a canary
    nobody can observe proves nothing); an old task set without data is only not compared. A deployment that ECS
    ends by itself (circuit breaker, a stop) ends the analysis. Every event carries ``steps`` (one
    ``{"percent", "started_at", "ended_at", "verdict"}`` per step reached) and the new task set's ``readings``; a
    ``breach`` event names the step (``failed_step``) so that the gate can stop the deployment with ROLLBACK.

    ECS bakes each step on its own clock, from its first share of traffic, while smoke_test, regression_test and
    the scheduler's hand-offs come before this trigger. ``first_share_after`` is ecs_deploy's last look that did not
    see that share yet (the share came after it, by one poll at most). So the first step's analysis begins there, not
    when the trigger starts: what users saw before the gate looked counts. Steps ECS baked entirely before the
    trigger looked are judged after the fact, on the new task set's target group from ``first_share_after`` to the
    first look, against the thresholds and alarms (not against the old task set, whose share changed meanwhile),
    and recorded as one step at the first one's share. CloudWatch keeps those minutes, so a canary that erred at 10 %
    while the regression suite ran is failed, even though ECS went on to 100 %.

    A deployment ECS completed (SUCCESSFUL) before the trigger saw its last step is not a failure by itself (rolling
    back a healthy release is one): once its missed steps pass, all traffic is on the new revision, so it is baked at
    100 % on the production target group for ``late_bake_seconds`` (the release's bake), as a release without steps
    would be, and judged on the thresholds, alarms and error lines alone.
    """

    deployment_arn: str
    steps: list[dict[str, Any]] = attrs.field(converter=copied_steps)
    production_target_group: str
    new_target_group: str
    deadline: float
    # The release's bake, given at 100 % to a deployment ECS completed before this trigger saw its last step.
    late_bake_seconds: float = 0.0
    # ecs_deploy's last look before the first share of traffic on the new revision (epoch seconds); None from a row
    # written before it existed (then the analysis begins at the trigger's first look, as it did).
    first_share_after: float | None = None

    async def _judge_missed_steps(self, metrics: ServiceMetricsHook,
                                  now: float) -> tuple[dict[str, Any], Any, str | None]:
        """Judge the steps ECS baked before this trigger's first look: the new task set's target group from
        ``first_share_after`` to now, on the thresholds and alarms. Return the step to record, the reading and the
        breach (None when they pass)."""
        assert self.first_share_after is not None
        new = await asyncio.to_thread(metrics.read, self.new_target_group,
                                      datetime.fromtimestamp(self.first_share_after, timezone.utc),
                                      datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=60), self.alarms)
        breach = step_breach(new, None, self.max_error_rate, self.max_p99_ms)
        # A step nobody's request reached proves nothing either way: said so, not "passed".
        verdict = "failed" if breach else "passed" if new.has_data else "no data"
        step = {"percent": float(self.steps[0]["percent"]), "started_at": self.first_share_after, "ended_at": now,
                "verdict": verdict}
        return step, new, breach

    def _unwatched(self, seen: list[dict[str, Any]]) -> str:
        """Return the catalog's steps this trigger did not see, as the log names them ("10 %, 100 %")."""
        percents = {float(step["percent"]) for step in seen}
        return ", ".join(f"{float(s['percent']):g} %" for s in self.steps if float(s["percent"]) not in percents)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        ecs = await sync_to_async(EcsDeploymentHook)(self.aws_conn_id, self.region_name)
        metrics = await sync_to_async(ServiceMetricsHook.from_connection)(self.aws_conn_id, self.region_name)
        logs = (await sync_to_async(ServiceLogsHook.from_connection)(self.aws_conn_id, self.region_name)
                if self.checks_logs else None)
        started_at = time.time()
        steps: list[dict[str, Any]] = []  # the steps reached, the last one open
        readings: dict[str, dict[str, Any]] = {}
        observations: list[str] = []
        scan: LogScan | None = None
        failing_since: float | None = None
        last_data = started_at
        late_until: float | None = None  # set when ECS completed before the last step was seen: the late bake's end

        def close(verdict: str, when: float) -> None:
            if steps and steps[-1]["verdict"] is None:
                steps[-1]["ended_at"], steps[-1]["verdict"] = when, verdict

        def event(status: str, **fields: Any) -> TriggerEvent:
            return TriggerEvent({"status": status, "observations": observations, "started_at": started_at,
                                 "ended_at": time.time(), "steps": steps,
                                 "readings": [readings[m] for m in sorted(readings)],
                                 "log_errors": None if scan is None else {
                                     "count": scan.count, "samples": scan.samples, "streams": scan.streams},
                                 "deployment_arn": self.deployment_arn, **fields})

        while True:
            now = time.time()
            try:
                deployment = await asyncio.to_thread(ecs.describe_deployment, self.deployment_arn)
                status, weight = deployment["status"], traffic_weight(deployment)
                ended = status not in IN_FLIGHT or status.startswith("ROLLBACK")
                if ended and status != "SUCCESSFUL":
                    close("stopped", now)
                    yield event("deployment_ended", deployment_status=status,
                                reason=f"ECS ended the deployment {status} during the steps: "
                                       f"{deployment.get('statusReason', '')}")
                    return
                if (not steps and self.first_share_after is not None and self.steps
                        and (ended or weight > float(self.steps[0]["percent"]))):
                    # ECS baked one step or more before this first look: judge them on what CloudWatch kept.
                    missed, reading, breach = await self._judge_missed_steps(metrics, now)
                    merge_minutes(readings, reading.minutes)
                    steps.append(missed)
                    shown = datetime.fromtimestamp(self.first_share_after, timezone.utc)
                    line = (f"step(s) before {'ECS completed' if ended else f'{weight:g} %'}, baked by ECS before "
                            f"this gate looked, judged after the fact since {shown:%H:%M:%S}: new {reading.describe()}")
                    observations.append(f"{datetime.fromtimestamp(now, timezone.utc):%H:%M:%S} {line}")
                    self.log.warning("%s (the stages before monitoring_gate outlasted them; judged on the thresholds "
                                     "and alarms, without comparing the old task set).", line)
                    if breach:
                        yield event("breach", failed_step=missed["percent"],
                                    reason=f"step {missed['percent']:g} % (judged after ECS baked it, from "
                                           f"{shown:%H:%M:%S} to the gate's first look): {breach}")
                        return
                if ended and late_until is None:
                    if steps and steps[-1]["percent"] >= 100:
                        close("passed", now)
                        yield event("success", last=summarize(deployment))
                        return
                    # ECS completed before the last step was seen (the stages before the gate outlasted the
                    # steps' bakes): all traffic is on the new revision, which is baked there now.
                    unwatched = self._unwatched(steps)
                    close("passed", now)
                    steps.append({"percent": 100.0, "started_at": now, "ended_at": None, "verdict": None})
                    last_data, late_until = now, now + self.late_bake_seconds
                    self.log.warning(
                        "ECS completed deployment %s before this gate saw its last step: step(s) %s baked without "
                        "analysis while ECS baked them (the stages before monitoring_gate took longer than those "
                        "steps' bakes; %s). Not a failure: all traffic is on the new revision, baked now at 100 %% "
                        "on the production target group for %.0fs (the release's bake_minutes). To have each step "
                        "analysed as it bakes, give the first step a bake longer than smoke_test and regression_test "
                        "take.", self.deployment_arn, unwatched, summarize(deployment), self.late_bake_seconds)
                    observations.append(f"{datetime.fromtimestamp(now, timezone.utc):%H:%M:%S} ECS completed the "
                                        f"deployment before step(s) {unwatched} were seen; baking at 100 % for "
                                        f"{self.late_bake_seconds:.0f}s")
                if not ended and weight > 0 and (not steps or weight != steps[-1]["percent"]):
                    close("passed", now)
                    if not steps and self.steps and float(self.steps[0]["percent"]) < weight:
                        self.log.warning("Step(s) before %.0f %% were baked by ECS before this gate began watching "
                                         "(the stages before monitoring_gate took longer than their bakes): not "
                                         "analysed. To have each step analysed, give the first step a bake longer "
                                         "than smoke_test and regression_test take.", weight)
                    # The first step began before this trigger, just after ecs_deploy's last look without it.
                    began = (self.first_share_after if not steps and self.first_share_after is not None else now)
                    steps.append({"percent": weight, "started_at": began, "ended_at": None, "verdict": None})
                    last_data = now
                    self.log.info("Step %d: %.0f %% of production traffic on the new task set (%s); analysing it "
                                  "against the old one while ECS bakes it.", len(steps), weight,
                                  summarize(deployment))
                if not ended and steps and weight >= 100 and deployment.get("lifecycleStage") == "CLEAN_UP":
                    close("passed", now)
                    yield event("success", last=summarize(deployment))
                    return
                if not steps:
                    if now > self.deadline:
                        yield event("timeout", reason=f"no traffic step began before the deadline: "
                                                      f"{summarize(deployment)}")
                        return
                    await asyncio.sleep(self.poll_seconds)
                    continue
                step = steps[-1]
                start = datetime.fromtimestamp(step["started_at"], timezone.utc)
                end = datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=60)
                final = step["percent"] >= 100
                new = await asyncio.to_thread(metrics.read, self.production_target_group if final
                                              else self.new_target_group, start, end, self.alarms)
                old = None if final else await asyncio.to_thread(metrics.read, self.production_target_group,
                                                                 start, end, [])
                if logs is not None and self.log_group and self.log_stream_prefix:
                    scan = await asyncio.to_thread(
                        logs.error_lines, self.log_group, self.log_stream_prefix, self.log_patterns,
                        datetime.fromtimestamp(steps[0]["started_at"], timezone.utc), end, SAMPLE_LINES)
            except Exception as exc:  # noqa: BLE001 - an unreadable AWS is tried again, within the budget
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= self.missing_data_seconds or now > self.deadline:
                    close("failed", now)
                    yield event("unreadable", reason=f"AWS could not be read for {now - failing_since:.0f}s (limit "
                                                     f"{self.missing_data_seconds:.0f}s): {exc}; a step nobody "
                                                     f"could watch proves nothing, treated as a failure")
                    return
                await asyncio.sleep(self.poll_seconds)
                continue
            failing_since = None
            merge_minutes(readings, new.minutes)
            line = (f"step {step['percent']:.0f} %: new {new.describe()}"
                    + ("" if old is None else f"; old {old.describe()}")
                    + (f"; {scan.describe()}" if scan is not None else ""))
            observations.append(f"{datetime.fromtimestamp(now, timezone.utc):%H:%M:%S} {line}")
            self.log.info("%s", line)
            breach = step_breach(new, old, self.max_error_rate, self.max_p99_ms) or (
                self._log_breach(scan) if scan is not None else None)
            if new.has_data:
                last_data = now
            elif now - last_data > self.missing_data_seconds:
                breach = (f"no requests seen on the new task set for {now - last_data:.0f}s (limit "
                          f"{self.missing_data_seconds:.0f}s): it may be down or unobserved; treated as a failure")
            if breach is None and self.window_closes_at is not None and now >= self.window_closes_at:
                breach = "the maintenance window closed during the steps"
            if breach is None and now > self.deadline:
                breach = f"the steps did not end before the deadline: {summarize(deployment)}"
            if breach:
                close("failed", now)
                yield event("breach", reason=f"step {step['percent']:.0f} %: {breach}", failed_step=step["percent"])
                return
            if late_until is not None and now >= late_until:
                close("passed", now)
                yield event("success", last=line)
                return
            await asyncio.sleep(self.poll_seconds if late_until is None
                                else min(self.poll_seconds, max(0.1, late_until - now)))
