"""MaintenanceWindowTimetable: one run at the start of each maintenance window (cron, duration, time zone).

Registered by plugins/omnisphere_plugin.py so that the scheduler can deserialize it. The data interval of a run is its
window, so tasks can read when the window closes (``data_interval_end``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk.timezone import coerce_datetime, utcnow
from airflow.timetables.base import DagRunInfo, DataInterval, TimeRestriction, Timetable

from omnisphere_release.windows import WindowSchedule


class MaintenanceWindowTimetable(Timetable):
    """Run once per maintenance window, at its start; a window still open when the DAG is scheduled runs at once."""

    def __init__(self, cron: str, duration: timedelta | int, timezone: str = "UTC") -> None:
        duration = duration if isinstance(duration, timedelta) else timedelta(minutes=duration)
        self.schedule = WindowSchedule(cron, duration, timezone)
        self.description = f"maintenance window {self.summary}"

    @property
    def summary(self) -> str:
        return self.schedule.summary()

    def serialize(self) -> dict[str, Any]:
        return {"cron": self.schedule.cron, "duration_minutes": self.schedule.duration.total_seconds() / 60,
                "timezone": self.schedule.tz_name}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> MaintenanceWindowTimetable:
        return cls(data["cron"], timedelta(minutes=data["duration_minutes"]), data["timezone"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaintenanceWindowTimetable) and self.serialize() == other.serialize()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.serialize().items())))

    def infer_manual_data_interval(self, *, run_after: Any) -> DataInterval:
        """A manual run belongs to the window open at that moment, or is a point in time outside windows."""
        window = self.schedule.window_at(run_after)
        if window is None:
            return DataInterval.exact(coerce_datetime(run_after))
        return DataInterval(coerce_datetime(window.start), coerce_datetime(window.end))

    def next_dagrun_info(self, *, last_automated_data_interval: DataInterval | None,
                         restriction: TimeRestriction) -> DagRunInfo | None:
        if last_automated_data_interval is not None:
            window = self.schedule.next_window(last_automated_data_interval.start + timedelta(seconds=1))
        else:
            earliest = coerce_datetime(restriction.earliest) if restriction.earliest else None
            now = utcnow()
            start_from = max(earliest, now) if (earliest and not restriction.catchup) else (earliest or now)
            window = self.schedule.window_at(start_from) or self.schedule.next_window(start_from)
        if not restriction.catchup:
            open_now = self.schedule.window_at(utcnow())
            if window.end <= utcnow():  # missed windows are not replayed
                window = open_now or self.schedule.next_window(utcnow())
        if restriction.latest is not None and window.start > restriction.latest:
            return None
        return DagRunInfo.interval(coerce_datetime(window.start), coerce_datetime(window.end))
