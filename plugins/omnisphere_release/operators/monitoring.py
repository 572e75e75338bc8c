"""monitoring_gate: watch errors, latency, alarms and the new tasks' error log lines for the bake period; fail at the
first breach; record the bake minute by minute, whatever its outcome."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import MonitoringThresholds, Service, load_catalog
from omnisphere_release.contracts import ReleaseRun
from omnisphere_release.hooks.cloudwatch import log_stream_prefix, minute_of
from omnisphere_release.hooks.ecs import IN_FLIGHT, EcsDeploymentError, EcsDeploymentHook, pinned_image
from omnisphere_release.hooks.http import SmokeTestHook
from omnisphere_release.operators.common import ServiceStageOperator
from omnisphere_release.operators.smoke import version_round
from omnisphere_release.triggers.monitoring import DeploymentStepsTrigger, MonitoringBakeTrigger

BAKE_XCOM_KEY = "bake"  # the bake record, for the report and the Releases page's chart


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _percent(value: Any) -> float | int:
    """Return a traffic share as the chart labels it: 10, not 10.0 (ECS reports floats)."""
    share = float(value)
    return int(share) if share.is_integer() else share


def bake_record(event: dict[str, Any], thresholds: MonitoringThresholds, started_at: float | None = None) -> dict[str, Any]:
    """Return the bake as the report and the Releases page read it, from the trigger's event.

    Every minute from the bake's start to its end has a reading; a minute CloudWatch had nothing for has nulls (the
    chart shows a gap there). ``log_errors`` is None when the catalog has no log check for the service.
    """
    started = float(event.get("started_at") or started_at or time.time())
    ended = float(event.get("ended_at") or time.time())
    passed = event.get("status") == "success"
    observed = {r["minute"]: r for r in event.get("readings") or []}
    first = datetime.fromisoformat(minute_of(datetime.fromtimestamp(started, timezone.utc)))
    last = datetime.fromisoformat(minute_of(datetime.fromtimestamp(ended, timezone.utc)))
    minutes = set(observed)
    while first <= last:
        minutes.add(first.isoformat())
        first += timedelta(minutes=1)
    readings = []
    for minute in sorted(minutes):
        raw = observed.get(minute)
        requests = None if raw is None else int(raw["requests"])
        readings.append({
            "minute": minute,
            "error_rate": raw["errors_5xx"] / raw["requests"] if raw and raw["requests"] else None,
            "p99_ms": raw["p99_seconds"] * 1000 if raw and raw.get("p99_seconds") is not None else None,
            "requests": requests,
        })
    log_errors = event.get("log_errors")
    return {
        "started_at": _iso(started), "ended_at": _iso(ended),
        "thresholds": {"max_error_rate": float(thresholds.max_error_rate),
                       "max_p99_latency_ms": int(thresholds.max_p99_latency_ms),
                       "missing_data_minutes": float(thresholds.missing_data_minutes)},
        "readings": readings,
        "failed_at": None if passed else _iso(ended),
        "verdict": "passed" if passed else "failed",
        "reason": None if passed else str(event.get("reason") or event.get("message") or event.get("status")),
        "steps": [{"percent": _percent(step["percent"]), "started_at": _iso(float(step["started_at"])),
                   "ended_at": _iso(float(step["ended_at"] or ended)), "verdict": step["verdict"] or "failed"}
                  for step in event.get("steps") or []],
        "log_errors": None if log_errors is None else {"count": int(log_errors["count"]),
                                                       "samples": list(log_errors["samples"])},
    }


class CloudWatchMonitoringGateOperator(ServiceStageOperator):
    """Defer to a trigger that reads CloudWatch every ``poll_seconds`` for ``bake_minutes``.

    No data for longer than the catalog's ``monitoring.missing_data_minutes`` is a failure by default: a service
    nobody can observe has not proven anything. Likewise CloudWatch itself: an outage shorter than that is waited out
    (the next reading covers it); a longer one fails the gate, saying for how long CloudWatch could not be read.

    With ``monitoring.logs`` in the catalog, the new task set's log streams (named after the image this release
    deployed, see hooks.cloudwatch.log_stream_prefix) are searched for the error patterns too. The bake record
    (XCom ``bake``) is pushed before the task ends, also when it fails.
    """

    template_fields = ("service", "environment", "bake_minutes")

    def __init__(self, *, service: str, bake_minutes: Any, poll_seconds: float = 10.0, **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        self.bake_minutes = bake_minutes
        self.poll_seconds = poll_seconds

    def execute(self, context: Context) -> None:
        service = load_catalog().get(self.service, self.environment)
        bake = float(self.bake_minutes) * 60
        m = service.monitoring
        now = time.time()
        window_end = ReleaseRun(context).window.get("window_end")
        closes_at = datetime.fromisoformat(window_end).timestamp() if window_end else None
        prefix = None
        if m.logs is not None:
            plan = ReleaseRun(context).plan
            if plan is None:
                raise AirflowFailException(f"Monitoring gate of {service.name}: preflight recorded no release plan, "
                                           f"so the image of the new task set (whose log streams to read) is unknown. "
                                           f"Next: the release rolls back.")
            # The image ecs_deploy put in the new revision (pinned to its digest): what the new tasks run. Known
            # without asking AWS, so an outage at the start of the bake is waited out like one during it.
            prefix = log_stream_prefix(pinned_image(plan["target_image"], plan["target_image_digest"]),
                                       service.ecs.container)
        steps = cast("dict[str, Any]", ReleaseRun(context).deployment).get("steps") or []
        if steps:
            return self._follow_steps(context, service, steps, prefix, closes_at, bake)
        self.log.info("Baking %s for %.0fs: failing on 5xx rate > %.2f%%, p99 > %d ms, alarms %s, %s, or no data for "
                      "%.0fs (target group %s).", service.name, bake, m.max_error_rate * 100, m.max_p99_latency_ms,
                      list(m.alarms) or "none",
                      f"more than {m.logs.max_error_lines} line(s) matching {', '.join(m.logs.error_patterns)} in "
                      f"{m.logs.log_group} streams {prefix}*" if m.logs else "no log check (no monitoring.logs)",
                      m.missing_data_minutes * 60, m.target_group)
        self.defer(
            trigger=MonitoringBakeTrigger(
                target_group=m.target_group, started_at=now, bake_until=now + bake, max_error_rate=m.max_error_rate,
                max_p99_ms=m.max_p99_latency_ms, missing_data_seconds=m.missing_data_minutes * 60,
                alarms=list(m.alarms), aws_conn_id=service.aws_conn_id,
                poll_seconds=min(self.poll_seconds, max(1.0, bake / 3)),
                window_seconds=max(60.0, min(300.0, bake)), window_closes_at=closes_at,
                log_group=m.logs.log_group if m.logs else None, log_stream_prefix=prefix,
                log_patterns=list(m.logs.error_patterns) if m.logs else None,
                max_error_lines=m.logs.max_error_lines if m.logs else 0),
            method_name="execute_complete",
            # The trigger ends by itself at the latest missing_data_minutes after the bake (CloudWatch unreadable).
            timeout=timedelta(seconds=bake + m.missing_data_minutes * 60 + 600),
        )

    def _follow_steps(self, context: Context, service: Service, steps: list[dict[str, Any]], prefix: str | None,
                      closes_at: float | None, bake: float) -> None:
        """Defer to DeploymentStepsTrigger: each traffic step of the canary or linear deployment analysed while ECS
        bakes it, the new task set (the alternate target group) against the old one (the production one).

        ECS bakes the steps on its own clock, from when ecs_deploy saw the first share: the analysis starts there,
        and steps the stages before the gate outlasted are judged after the fact on what CloudWatch kept. A
        deployment ECS completed before the trigger saw its last step also gets the release's ``bake`` at 100 % (a
        success of ECS is not a reason to roll back)."""
        m = service.monitoring
        deployment = ReleaseRun(context).deployment
        try:
            _, alternate = EcsDeploymentHook(service.aws_conn_id).task_set_target_groups(service.ecs.cluster,
                                                                                        service.ecs.service)
        except EcsDeploymentError as exc:
            raise AirflowException(f"Monitoring gate of {service.name}: {exc}. Retrying if retries remain; "
                                   f"otherwise the release rolls back.") from None
        if alternate is None:
            raise AirflowFailException(
                f"Monitoring gate of {service.name}: ECS service {service.ecs.cluster}/{service.ecs.service} names "
                f"no alternate target group (loadBalancers[].advancedConfiguration.alternateTargetGroupArn), so the "
                f"new task set's metrics cannot be told from the old one's. ECS's canary and linear need one: add it "
                f"to the service. Next: the release rolls back.")
        # The deployment's own limit and bakes, plus the release's bake in case ECS completed before the last step
        # was seen (then the new revision is baked at 100 % for that long).
        timeout = service.deploy.timeout_minutes * 60 + sum(float(s["bake_minutes"]) for s in steps) * 60 + bake
        self.log.info("Following %s's %s steps %s: at each, the new task set (%s) against the old one (%s) while "
                      "ECS bakes it; failing on a 5xx rate > %.2f%% or p99 > %d ms, or clearly worse than the old "
                      "task set, alarms %s, %s, or no request on the new task set for %.0fs. A failing step stops "
                      "the deployment with ECS's ROLLBACK.", service.name,
                      deployment.get("configuration", {}).get("strategy"),
                      " -> ".join(f"{s['percent']:g} %" for s in steps), alternate, m.target_group,
                      m.max_error_rate * 100, m.max_p99_latency_ms, list(m.alarms) or "none",
                      f"error log lines in {m.logs.log_group} streams {prefix}*" if m.logs else "no log check",
                      m.missing_data_minutes * 60)
        self.defer(
            trigger=DeploymentStepsTrigger(
                deployment_arn=deployment["deployment_arn"], steps=steps, production_target_group=m.target_group,
                new_target_group=alternate, max_error_rate=m.max_error_rate, max_p99_ms=m.max_p99_latency_ms,
                missing_data_seconds=m.missing_data_minutes * 60, deadline=time.time() + timeout,
                alarms=list(m.alarms), aws_conn_id=service.aws_conn_id, poll_seconds=min(self.poll_seconds, 2.0),
                window_closes_at=closes_at, log_group=m.logs.log_group if m.logs else None,
                log_stream_prefix=prefix, log_patterns=list(m.logs.error_patterns) if m.logs else None,
                max_error_lines=m.logs.max_error_lines if m.logs else 0, late_bake_seconds=bake,
                first_share_after=deployment.get("first_share_after")),
            method_name="steps_complete",
            timeout=timedelta(seconds=timeout + m.missing_data_minutes * 60 + 600),
        )

    def steps_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """End the stepped bake: on a failing step, stop the deployment with ECS's ROLLBACK before the next step; on
        success, check at 100 % that every /version answer is the released image."""
        service = load_catalog().get(self.service, self.environment)
        steps = " -> ".join(f"{s['percent']:g} % {s['verdict']}" for s in event.get("steps") or [])
        if event.get("status") == "success":
            plan = ReleaseRun(context).plan
            assert plan is not None, "monitoring_gate runs only after preflight succeeded"
            http = SmokeTestHook(service.http_conn_id)
            [version] = http.probe_until_deadline([], service.smoke_deadline_seconds, service.name,
                                                  also=lambda: [version_round(http, plan)])
            if not version.ok:
                event = {**event, "status": "version", "reason": f"all traffic on the new task set, but "
                                                                 f"{version.describe()}"}
            else:
                record = self._record(context, event, service.monitoring)
                self.log.info("Every step passed (%s); at 100 %% %s. Next: finalize.", steps, version.describe())
                return {"observations": event.get("observations", []), "steps": record["steps"]}
        record = self._record(context, event, service.monitoring)
        for line in event.get("observations", []):
            self.log.info("observed %s", line)
        log_errors = record["log_errors"]
        if log_errors and log_errors["samples"]:
            self.log.error("First %d of %d error log line(s) of the new task set:", len(log_errors["samples"]),
                           log_errors["count"])
            for sample in log_errors["samples"]:
                self.log.error("  %s", sample)
        arn = str(event.get("deployment_arn") or ReleaseRun(context).deployment.get("deployment_arn"))
        stopped = ""
        if event.get("status") != "deployment_ended":
            try:
                ecs = EcsDeploymentHook(service.aws_conn_id)
                if ecs.describe_deployment(arn)["status"] in IN_FLIGHT - {"ROLLBACK_REQUESTED",
                                                                         "ROLLBACK_IN_PROGRESS"}:
                    ecs.stop_with_rollback(arn)
                    stopped = " Stopped the deployment with ECS's ROLLBACK: the old task set takes all traffic again."
                    self.log.warning("Stopped deployment %s with ROLLBACK at step %s (steps: %s).", arn,
                                     event.get("failed_step"), steps)
            except EcsDeploymentError:
                self.log.exception("Could not stop deployment %s with ROLLBACK; rollback_ecs tries again.", arn)
        raise AirflowFailException(f"Monitoring gate failed: {record['reason']} (steps: {steps or 'none reached'})."
                                   f"{stopped} Next: the release rolls back.")

    def _record(self, context: Context, event: dict[str, Any], thresholds: MonitoringThresholds) -> dict[str, Any]:
        record = bake_record(event, thresholds)
        context["ti"].xcom_push(key=BAKE_XCOM_KEY, value=record)
        return record

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        service = load_catalog().get(self.service, self.environment)
        record = self._record(context, event, service.monitoring)
        observations = event.get("observations", [])
        log_errors = record["log_errors"]
        if event.get("status") == "success":
            self.log.info("Bake passed: %d reading(s), %d minute(s) recorded, %s, last: %s. Next: finalize.",
                          len(observations), len(record["readings"]),
                          f"{log_errors['count']} error log line(s)" if log_errors else "no log check",
                          event.get("last"))
            return {"observations": observations}
        for line in observations:
            self.log.info("observed %s", line)
        if log_errors and log_errors["samples"]:
            self.log.error("First %d of %d error log line(s) of the new task set:", len(log_errors["samples"]),
                           log_errors["count"])
            for sample in log_errors["samples"]:
                self.log.error("  %s", sample)
        raise AirflowFailException(f"Monitoring gate failed: {record['reason']}. Next: the release rolls back.")
