"""Wait for an ECS service deployment to finish (or, for traffic-shifting strategies, to take all traffic)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async

from omnisphere_release.hooks.ecs import IN_FLIGHT, TRAFFIC_SHIFTED_STAGES, EcsDeploymentHook, summarize


class EcsServiceDeploymentTrigger(BaseTrigger):
    """Poll DescribeServiceDeployments until the deployment succeeds, fails, or the deadline passes.

    ``deadline`` is an absolute epoch time, so a restarted triggerer does not extend the wait.
    """

    def __init__(self, deployment_arn: str, deadline: float, aws_conn_id: str | None = "aws_default",
                 region_name: str | None = None, done_on_traffic_shift: bool = False,
                 poll_seconds: float = 5.0) -> None:
        super().__init__()
        self.deployment_arn = deployment_arn
        self.deadline = deadline
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.done_on_traffic_shift = done_on_traffic_shift
        self.poll_seconds = poll_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "deployment_arn": self.deployment_arn, "deadline": self.deadline, "aws_conn_id": self.aws_conn_id,
            "region_name": self.region_name, "done_on_traffic_shift": self.done_on_traffic_shift,
            "poll_seconds": self.poll_seconds,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = await sync_to_async(EcsDeploymentHook)(self.aws_conn_id, self.region_name)
        last = ""
        while True:
            try:
                deployment = await asyncio.to_thread(hook.describe_deployment, self.deployment_arn)
            except Exception as exc:  # noqa: BLE001 - reported to the task, which decides
                yield TriggerEvent({"status": "error", "message": f"cannot read the deployment: {exc}",
                                    "deployment_arn": self.deployment_arn})
                return
            line = summarize(deployment)
            if line != last:
                self.log.info("Deployment %s: %s", self.deployment_arn.rsplit("/", 1)[-1], line)
                last = line
            status = deployment["status"]
            if status == "SUCCESSFUL" or (self.done_on_traffic_shift and status == "IN_PROGRESS"
                                          and deployment.get("lifecycleStage") in TRAFFIC_SHIFTED_STAGES):
                yield TriggerEvent({"status": "success", "deployment_status": status, "summary": line,
                                    "deployment_arn": self.deployment_arn})
                return
            if status not in IN_FLIGHT or status.startswith("ROLLBACK"):
                yield TriggerEvent({"status": "failed", "deployment_status": status, "summary": line,
                                    "reason": deployment.get("statusReason", ""),
                                    "deployment_arn": self.deployment_arn})
                return
            if time.time() > self.deadline:
                yield TriggerEvent({"status": "timeout", "deployment_status": status, "summary": line,
                                    "deployment_arn": self.deployment_arn})
                return
            await asyncio.sleep(self.poll_seconds)
