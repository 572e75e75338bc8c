"""monitoring_gate: watch errors, latency and alarms for the bake period; fail at the first breach."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from omnisphere_release.catalog import load_catalog
from omnisphere_release.contracts import ReleaseRun
from omnisphere_release.operators.common import ServiceStageOperator
from omnisphere_release.triggers.monitoring import MonitoringBakeTrigger


class CloudWatchMonitoringGateOperator(ServiceStageOperator):
    """Defer to a trigger that reads CloudWatch every ``poll_seconds`` for ``bake_minutes``.

    No data for longer than the catalog's ``monitoring.missing_data_minutes`` is a failure by default: a service
    nobody can observe has not proven anything. Likewise CloudWatch itself: an outage shorter than that is waited out
    (the next reading covers it); a longer one fails the gate, saying for how long CloudWatch could not be read.
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
        self.log.info("Baking %s for %.0fs: failing on 5xx rate > %.2f%%, p99 > %d ms, alarms %s, or no data for "
                      "%.0fs (target group %s).", service.name, bake, m.max_error_rate * 100, m.max_p99_latency_ms,
                      list(m.alarms) or "none", m.missing_data_minutes * 60, m.target_group)
        self.defer(
            trigger=MonitoringBakeTrigger(
                target_group=m.target_group, started_at=now, bake_until=now + bake, max_error_rate=m.max_error_rate,
                max_p99_ms=m.max_p99_latency_ms, missing_data_seconds=m.missing_data_minutes * 60,
                alarms=list(m.alarms), aws_conn_id=service.aws_conn_id,
                poll_seconds=min(self.poll_seconds, max(1.0, bake / 3)),
                window_seconds=max(60.0, min(300.0, bake)), window_closes_at=closes_at),
            method_name="execute_complete",
            # The trigger ends by itself at the latest missing_data_minutes after the bake (CloudWatch unreadable).
            timeout=timedelta(seconds=bake + m.missing_data_minutes * 60 + 600),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        observations = event.get("observations", [])
        if event.get("status") == "success":
            self.log.info("Bake passed: %d reading(s), last: %s. Next: finalize.", len(observations), event.get("last"))
            return {"observations": observations}
        for line in observations:
            self.log.info("observed %s", line)
        raise AirflowFailException(f"Monitoring gate failed: {event.get('reason') or event.get('message')}. "
                                   f"Next: the release rolls back.")
