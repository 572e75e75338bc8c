"""wait_for_window: a release starts inside its service's maintenance window, or by an explicit, recorded choice."""

from __future__ import annotations

import json
import re
import statistics
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from omnisphere_release.catalog import Service, load_catalog
from omnisphere_release.windows import WindowSchedule

WINDOW_PATTERN = r"^(next|now|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?(\.\d+)?(Z|[+-]\d{2}:\d{2}))$"


def schedule_of(service: Service) -> WindowSchedule:
    w = service.maintenance_window
    return WindowSchedule(w.cron, timedelta(minutes=w.duration_minutes), w.timezone)


class WaitForMaintenanceWindowOperator(BaseOperator):
    """Wait, deferred (no worker slot held), until the release may start.

    ``window``: ``next`` waits for the service's next maintenance window (or goes on at once if one is open);
    an ISO 8601 time waits until then, and the window lasts the catalog's duration from there; ``now`` goes on at once
    and needs ``force_reason``, which the report keeps.
    """

    template_fields = ("service", "window", "force_reason")

    def __init__(self, *, service: str, window: str = "next", force_reason: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.window = window
        self.force_reason = force_reason

    def execute(self, context: Any) -> dict[str, Any]:
        service = load_catalog().get(self.service)
        schedule = schedule_of(service)
        now = datetime.now(timezone.utc)
        if self.window == "now":
            if not (self.force_reason or "").strip():
                raise AirflowFailException("param window=now needs param force_reason: say why this release cannot "
                                           f"wait for the maintenance window ({schedule.summary()})")
            self.log.info("Releasing %s now, outside its maintenance window (%s), because: %s", service.name,
                          schedule.summary(), self.force_reason)
            return {"mode": "now", "force_reason": self.force_reason, "window_start": now.isoformat(),
                    "window_end": None}
        if self.window == "next":
            window = schedule.window_at(now) or schedule.next_window(now)
            start, end = window.start, window.end
        else:
            if not re.match(WINDOW_PATTERN, self.window):
                raise AirflowFailException(f"param window {self.window!r}: use next, now, or an ISO 8601 time with a "
                                           f"zone, e.g. 2026-12-06T02:00:00+01:00")
            start = datetime.fromisoformat(self.window.replace("Z", "+00:00"))
            end = start + schedule.duration
            if end <= now:
                raise AirflowFailException(f"param window {self.window}: that window ended at {end.isoformat()}")
        result = {"mode": "window", "window_start": start.isoformat(), "window_end": end.isoformat(),
                  "force_reason": ""}
        if start <= now:
            self.log.info("The maintenance window is open (%s to %s, %s); starting the release.", start, end,
                          schedule.summary())
            return result
        self.log.info("Waiting (deferred, no worker slot held) for the maintenance window of %s: opens %s, closes %s "
                      "(%s).", service.name, start.isoformat(), end.isoformat(), schedule.summary())
        context["ti"].xcom_push(key="window", value=result)
        self.defer(trigger=DateTimeTrigger(moment=start), method_name="execute_complete")
        return result  # not reached: defer raises

    def execute_complete(self, context: Any, event: Any = None) -> dict[str, Any]:
        result = context["ti"].xcom_pull(task_ids=self.task_id, key="window") or {}
        self.log.info("The maintenance window opened (%s); starting the release.", result.get("window_start"))
        return {**result, "waited_deferred": True}


def estimate_minutes(service: Service, s3: Any, bucket: str, log: Any, samples: int = 5) -> tuple[float, str]:
    """Estimate a release's duration from its last successful reports in the backup bucket, else the catalog."""
    try:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{service.name}/")
        reports = sorted((o for o in listing.get("Contents", []) if o["Key"].endswith("release-report.json")),
                         key=lambda o: o["LastModified"], reverse=True)
        durations = []
        for item in reports[:20]:
            report = json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
            if report.get("outcome") == "released":
                durations.append(sum(s.get("seconds") or 0 for s in report.get("stages", [])) / 60)
            if len(durations) >= samples:
                break
        if durations:
            return statistics.median(durations), f"median of the last {len(durations)} successful release(s)"
    except Exception as exc:  # noqa: BLE001 - fall back to the catalog's estimate
        log.warning("Could not read earlier release reports for an estimate: %s", exc)
    return service.deploy.estimated_minutes, "the catalog's deploy.estimated_minutes"
