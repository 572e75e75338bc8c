"""Wait, in the triggerer, until a release train's start gate may let its service release (or must skip it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async

from omnisphere_release import release_train


class ReleaseTrainSlotTrigger(BaseTrigger):
    """Every ``poll_seconds``, read the task states of the release_all run and decide with
    :func:`release_train.start_decision`; fire once the decision is no longer "wait".

    Reading task states goes through the Execution API, as the standard provider's WorkflowTrigger does. A failed read
    is tried again at the next poll: the gate only waits, it changes nothing.
    """

    def __init__(self, dag_id: str, run_id: str, service: str, order: list[str], max_parallel: int,
                 poll_seconds: float = 10.0) -> None:
        super().__init__()
        self.dag_id = dag_id
        self.run_id = run_id
        self.service = service
        self.order = list(order)
        self.max_parallel = max_parallel
        self.poll_seconds = poll_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "dag_id": self.dag_id, "run_id": self.run_id, "service": self.service, "order": self.order,
            "max_parallel": self.max_parallel, "poll_seconds": self.poll_seconds,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        last = ""
        while True:
            try:
                states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
                    dag_id=self.dag_id, run_ids=[self.run_id])
            except Exception as exc:  # noqa: BLE001 - waiting is harmless: read again at the next poll
                self.log.warning("Cannot read the task states of %s (%s); trying again in %.0fs.", self.run_id, exc,
                                 self.poll_seconds)
            else:
                per_run = states.get(self.run_id, {}) if isinstance(states, dict) else {}
                decision = release_train.start_decision(
                    self.service, self.order, {t: str(s or "none") for t, s in per_run.items()}, self.max_parallel)
                if decision.action != "wait":
                    yield TriggerEvent({"action": decision.action, "why": decision.why})
                    return
                if decision.why != last:
                    self.log.info("%s waits for a release slot: %s.", self.service, decision.why)
                    last = decision.why
            await asyncio.sleep(self.poll_seconds)
