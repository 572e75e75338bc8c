"""Watch a service's metrics for the bake period; fire as soon as a threshold is breached."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async

from omnisphere_release.hooks.cloudwatch import ServiceMetricsHook

WARN_EVERY_SECONDS = 30.0


class MonitoringBakeTrigger(BaseTrigger):
    """Every ``poll_seconds`` until ``bake_until`` (epoch seconds), read the metrics of the last ``window_seconds``.

    Fails on an error rate or p99 latency above the thresholds, on a firing alarm, and, unless ``allow_missing_data``,
    when no request was seen for ``missing_data_seconds``. ``window_closes_at`` (epoch seconds, optional) fails the
    gate if the maintenance window closes before the bake ends.

    A failed read (after the AWS client's own retries) is tried again at the next poll: an outage shorter than
    ``missing_data_seconds`` is survived, and the next reading looks back over it. One that lasts longer, or that
    lasts past ``bake_until + missing_data_seconds`` (absolute, so a triggerer restart does not extend it), ends the
    bake as a failure (``unreadable``) saying for how long CloudWatch could not be read.
    """

    def __init__(self, target_group: str, started_at: float, bake_until: float, max_error_rate: float,
                 max_p99_ms: float, missing_data_seconds: float, alarms: list[str] | None = None,
                 aws_conn_id: str | None = "aws_default", region_name: str | None = None,
                 poll_seconds: float = 10.0, window_seconds: float = 120.0, allow_missing_data: bool = False,
                 window_closes_at: float | None = None) -> None:
        super().__init__()
        self.target_group = target_group
        self.started_at = started_at
        self.bake_until = bake_until
        self.max_error_rate = max_error_rate
        self.max_p99_ms = max_p99_ms
        self.missing_data_seconds = missing_data_seconds
        self.alarms = list(alarms or [])
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.poll_seconds = poll_seconds
        self.window_seconds = window_seconds
        self.allow_missing_data = allow_missing_data
        self.window_closes_at = window_closes_at

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "target_group": self.target_group, "started_at": self.started_at, "bake_until": self.bake_until,
            "max_error_rate": self.max_error_rate, "max_p99_ms": self.max_p99_ms,
            "missing_data_seconds": self.missing_data_seconds, "alarms": self.alarms,
            "aws_conn_id": self.aws_conn_id, "region_name": self.region_name, "poll_seconds": self.poll_seconds,
            "window_seconds": self.window_seconds, "allow_missing_data": self.allow_missing_data,
            "window_closes_at": self.window_closes_at,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = await sync_to_async(ServiceMetricsHook.from_connection)(self.aws_conn_id, self.region_name)
        last_data = self.started_at  # the clock for "no data" starts with the bake
        failing_since: float | None = None  # when CloudWatch stopped answering, if it has
        warned_at = 0.0
        # Absolute, from serialized times: a triggerer restart during an outage cannot stretch it.
        give_up_at = self.bake_until + self.missing_data_seconds
        observations: list[str] = []
        while True:
            now = time.time()
            # After an outage, look back over it too: a breach while CloudWatch could not be read still counts.
            since = now if failing_since is None else failing_since
            start = datetime.fromtimestamp(max(self.started_at, since - self.window_seconds), timezone.utc)
            end = datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=60)
            try:
                window = await asyncio.to_thread(hook.read, self.target_group, start, end, self.alarms)
            except Exception as exc:  # noqa: BLE001 - an unreadable CloudWatch is tried again, within the budget
                failing_since = now if failing_since is None else failing_since
                unread = now - failing_since
                if unread >= self.missing_data_seconds or now >= give_up_at:
                    yield TriggerEvent({"status": "unreadable", "observations": observations,
                                        "reason": f"CloudWatch could not be read for {unread:.0f}s (limit "
                                                  f"{self.missing_data_seconds:.0f}s, the catalog's "
                                                  f"monitoring.missing_data_minutes): {exc}; a bake nobody could "
                                                  f"watch proves nothing, treated as a failure"})
                    return
                if now - warned_at >= WARN_EVERY_SECONDS:  # one line per outage and half minute, not per poll
                    self.log.warning("Bake %.0f/%.0fs: cannot read CloudWatch for %.0fs: %s; trying again every "
                                     "%.0fs (a failure after %.0fs).", now - self.started_at,
                                     self.bake_until - self.started_at, unread, exc, self.poll_seconds,
                                     self.missing_data_seconds)
                    warned_at = now
                if self.window_closes_at is not None and now >= self.window_closes_at:
                    yield TriggerEvent({"status": "window_closed", "observations": observations,
                                        "reason": "the maintenance window closed during the bake"})
                    return
                await asyncio.sleep(max(0.1, min(self.poll_seconds, give_up_at - now)))
                continue
            if failing_since is not None:
                self.log.info("CloudWatch readable again after %.0fs; this reading covers the outage.",
                              now - failing_since)
                failing_since = None
            line = window.describe()
            observations.append(f"{datetime.fromtimestamp(now, timezone.utc):%H:%M:%S} {line}")
            self.log.info("Bake %.0f/%.0fs: %s", now - self.started_at, self.bake_until - self.started_at, line)
            breach = self._breach(window)
            if breach:
                yield TriggerEvent({"status": "breach", "reason": breach, "observations": observations})
                return
            if window.has_data:
                last_data = now
            elif not self.allow_missing_data and now - last_data > self.missing_data_seconds:
                yield TriggerEvent({"status": "no_data", "observations": observations,
                                    "reason": f"no requests seen for {now - last_data:.0f}s (limit "
                                              f"{self.missing_data_seconds:.0f}s): the service may be down or "
                                              f"unobserved; treated as a failure"})
                return
            if self.window_closes_at is not None and now >= self.window_closes_at:
                yield TriggerEvent({"status": "window_closed", "observations": observations,
                                    "reason": "the maintenance window closed during the bake"})
                return
            if now >= self.bake_until:
                yield TriggerEvent({"status": "success", "observations": observations, "last": line})
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
