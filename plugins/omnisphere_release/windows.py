"""Maintenance windows: a start (cron, in a time zone), a duration, and the arithmetic around them. No Airflow here.

Rules, for the nights when the clocks change:
- A window starts at the cron's wall-clock time in its zone. If that time does not exist that day (spring forward,
  e.g. 02:30 in Paris on the last Sunday of March), it starts at the first instant that does (03:00).
  If it exists twice (fall back), it starts at the first of the two.
- A window lasts ``duration`` of real time from its start, so a release estimate means the same on every night.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from croniter import croniter

DAY_NAMES = {"0": "Sun", "1": "Mon", "2": "Tue", "3": "Wed", "4": "Thu", "5": "Fri", "6": "Sat", "7": "Sun"}


@dataclass(frozen=True)
class Window:
    start: datetime  # aware, UTC
    end: datetime

    def contains(self, at: datetime) -> bool:
        return self.start <= at < self.end

    def remaining(self, at: datetime) -> timedelta:
        return max(self.end - at, timedelta(0))


class WindowSchedule:
    def __init__(self, cron: str, duration: timedelta, tz: str) -> None:
        if not croniter.is_valid(cron):
            raise ValueError(f"{cron!r} is not a 5-field cron expression")
        if duration <= timedelta(0):
            raise ValueError("a window needs a positive duration")
        self.cron = cron
        self.duration = duration
        self.tz_name = tz
        self.tz = ZoneInfo(tz)

    def _to_utc(self, local_naive: datetime) -> datetime:
        aware = local_naive.replace(tzinfo=self.tz, fold=0)
        utc = aware.astimezone(timezone.utc)
        if utc.astimezone(self.tz).replace(tzinfo=None) != local_naive:
            # The wall-clock time does not exist (the clocks jumped over it): start at the jump.
            gap_end = (local_naive + timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
            while gap_end.replace(tzinfo=self.tz).astimezone(timezone.utc).astimezone(self.tz).replace(
                    tzinfo=None) != gap_end:
                gap_end += timedelta(minutes=15)
            utc = gap_end.replace(tzinfo=self.tz).astimezone(timezone.utc)
        return utc

    def _starts_after(self, at: datetime) -> croniter:
        local = at.astimezone(self.tz).replace(tzinfo=None)
        return croniter(self.cron, local)

    def next_window(self, after: datetime) -> Window:
        """Return the first window that starts at or after ``after``."""
        iterator = self._starts_after(after - timedelta(seconds=1))
        while True:
            start = self._to_utc(iterator.get_next(datetime))
            if start >= after:
                return Window(start, start + self.duration)

    def window_at(self, at: datetime) -> Window | None:
        """Return the window open at ``at``, if any."""
        iterator = self._starts_after(at - self.duration)
        # Windows that started within one duration before ``at`` are the only candidates (a DST shift can move a
        # start by an hour, so look one step further).
        for _ in range(3):
            start = self._to_utc(iterator.get_next(datetime))
            window = Window(start, start + self.duration)
            if window.contains(at):
                return window
            if start > at:
                return None
        return None

    def previous_window(self, before: datetime) -> Window:
        local = before.astimezone(self.tz).replace(tzinfo=None)
        start = self._to_utc(croniter(self.cron, local).get_prev(datetime))
        return Window(start, start + self.duration)

    def summary(self) -> str:
        """Say it the way people do: ``Sun 02:00-04:00 Europe/Paris`` or ``Daily 01:30-02:30 UTC``."""
        fields = self.cron.split()
        minute, hour, day_of_month, month, day_of_week = fields
        if minute.isdigit() and hour.isdigit() and day_of_month == "*" and month == "*":
            start = datetime(2000, 1, 1, int(hour), int(minute))
            end = start + self.duration
            days = "Daily" if day_of_week == "*" else ",".join(
                DAY_NAMES.get(d, d.title()) for d in day_of_week.split(","))
            more = f" (+{(end.date() - start.date()).days}d)" if end.date() != start.date() else ""
            return f"{days} {start:%H:%M}-{end:%H:%M}{more} {self.tz_name}"
        return f"{self.cron} for {self.duration} ({self.tz_name})"
