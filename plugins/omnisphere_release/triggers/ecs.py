"""Wait for an ECS service deployment to finish (or, for traffic-shifting strategies, to take all traffic)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async

from omnisphere_release.hooks.ecs import (
    IN_FLIGHT,
    TRAFFIC_SHIFTED_STAGES,
    EcsDeploymentHook,
    summarize,
    traffic_weight,
)

# How long the deployment may stay unreadable (AWS throttling, 5xx, unreachable, after the client's own retries)
# before the wait gives up and lets the task retry, which reattaches to the same deployment.
READ_FAILURE_BUDGET_SECONDS = 300.0
WARN_EVERY_SECONDS = 30.0


def all_traffic_shifted(deployment: dict[str, Any]) -> bool:
    """Say whether the new revision takes all production traffic: a bake or clean-up stage, and (when ECS reports
    it) 100 % of the traffic. A canary's own bake at 10 % is not the end of the shift."""
    weight = (deployment.get("targetServiceRevision") or {}).get("requestedProductionTrafficWeight")
    return deployment.get("lifecycleStage") in TRAFFIC_SHIFTED_STAGES and (weight is None or float(weight) >= 100)


class EcsServiceDeploymentTrigger(BaseTrigger):
    """Poll DescribeServiceDeployments until the deployment succeeds, fails, or the deadline passes.

    ``deadline`` is an absolute epoch time, so a restarted triggerer does not extend the wait. With ``settle``, any
    end is the awaited one: the event is ``settled`` as soon as the deployment leaves flight, whatever its status
    (the way back waits so for the deployments it stopped or started).

    A read that fails is tried again at the next poll: not reading the deployment says nothing about it. Only when
    reads have failed for ``read_failure_seconds`` in a row does it fire ``error`` (the task may retry and reattach);
    past the deadline it fires ``timeout`` as usual.
    """

    def __init__(self, deployment_arn: str, deadline: float, aws_conn_id: str | None = "aws_default",
                 region_name: str | None = None, done_on_traffic_shift: bool = False,
                 poll_seconds: float = 5.0, settle: bool = False,
                 read_failure_seconds: float = READ_FAILURE_BUDGET_SECONDS,
                 done_at_percent: float | None = None, done_at_stage: str | None = None) -> None:
        super().__init__()
        # Blue/green with the platform's test-traffic hook: done when ECS holds at that stage (green on the test
        # listener), for smoke_test to test green there and answer the hook before the production switch.
        self.done_at_stage = done_at_stage
        # Canary and linear with steps: done once the first step's share of traffic is on the new revision (the
        # monitoring gate follows the steps from there and stops the deployment with ROLLBACK at a failing one).
        self.done_at_percent = done_at_percent
        self.deployment_arn = deployment_arn
        self.deadline = deadline
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.done_on_traffic_shift = done_on_traffic_shift
        self.poll_seconds = poll_seconds
        self.settle = settle
        self.read_failure_seconds = read_failure_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "deployment_arn": self.deployment_arn, "deadline": self.deadline, "aws_conn_id": self.aws_conn_id,
            "region_name": self.region_name, "done_on_traffic_shift": self.done_on_traffic_shift,
            "poll_seconds": self.poll_seconds, "settle": self.settle,
            "read_failure_seconds": self.read_failure_seconds, "done_at_percent": self.done_at_percent,
            "done_at_stage": self.done_at_stage,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = await sync_to_async(EcsDeploymentHook)(self.aws_conn_id, self.region_name)
        name = self.deployment_arn.rsplit("/", 1)[-1]
        last = ""
        failing_since: float | None = None
        warned_at = 0.0
        read_at: float | None = None  # the last read that gave the deployment: what is seen next came after it
        while True:
            try:
                asked_at = time.time()
                deployment = await asyncio.to_thread(hook.describe_deployment, self.deployment_arn)
            except Exception as exc:  # noqa: BLE001 - any failed read is tried again, within the budget
                now = time.time()
                failing_since = now if failing_since is None else failing_since
                message = f"cannot read the deployment for {now - failing_since:.0f}s: {exc}"
                if now > self.deadline:
                    yield TriggerEvent({"status": "timeout", "deployment_status": "unknown", "summary": message,
                                        "deployment_arn": self.deployment_arn})
                    return
                if now - failing_since >= self.read_failure_seconds:
                    yield TriggerEvent({"status": "error", "message": message, "deployment_arn": self.deployment_arn})
                    return
                if now - warned_at >= WARN_EVERY_SECONDS:  # one line per outage and half minute, not per poll
                    self.log.warning("Deployment %s: %s; trying again every %.0fs (giving up after %.0fs of failed "
                                     "reads, or at the deadline).", name, message, self.poll_seconds,
                                     self.read_failure_seconds)
                    warned_at = now
                await asyncio.sleep(self.poll_seconds)
                continue
            if failing_since is not None:
                self.log.info("Deployment %s: readable again after %.0fs.", name, time.time() - failing_since)
                failing_since = None
            line = summarize(deployment)
            if line != last:
                self.log.info("Deployment %s: %s", name, line)
                last = line
            status = deployment["status"]
            if self.settle and status not in IN_FLIGHT:
                yield TriggerEvent({"status": "settled", "deployment_status": status, "summary": line,
                                    "reason": deployment.get("statusReason", ""),
                                    "deployment_arn": self.deployment_arn})
                return
            if not self.settle and (status == "SUCCESSFUL" or (
                    self.done_on_traffic_shift and status == "IN_PROGRESS" and all_traffic_shifted(deployment)) or (
                    self.done_at_percent is not None and status == "IN_PROGRESS"
                    and traffic_weight(deployment) >= self.done_at_percent) or (
                    self.done_at_stage is not None and status == "IN_PROGRESS"
                    and deployment.get("lifecycleStage") == self.done_at_stage)):
                # "after": the last read that did not see it (the deployment's start on a first read that did).
                started = deployment.get("startedAt") or deployment.get("createdAt")
                after = read_at if read_at is not None else (
                    started.timestamp() if isinstance(started, datetime) else asked_at)
                yield TriggerEvent({"status": "success", "deployment_status": status, "summary": line,
                                    "deployment_arn": self.deployment_arn, "after": after})
                return
            if not self.settle and (status not in IN_FLIGHT or status.startswith("ROLLBACK")):
                yield TriggerEvent({"status": "failed", "deployment_status": status, "summary": line,
                                    "reason": deployment.get("statusReason", ""),
                                    "deployment_arn": self.deployment_arn})
                return
            if time.time() > self.deadline:
                yield TriggerEvent({"status": "timeout", "deployment_status": status, "summary": line,
                                    "deployment_arn": self.deployment_arn})
                return
            read_at = asked_at
            await asyncio.sleep(self.poll_seconds)
