"""The release queue: manifests (service -> image tag) waiting for a release_all window, kept in an Airflow Variable.

Operators queue a manifest with the ``queue_release`` DAG (UI or API); at each window, the scheduled ``release_all``
run takes the manifest queued for that window, if any, and releases it. Pure functions here; the DAGs do the I/O.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from omnisphere_release.windows import WindowSchedule

QUEUE_VARIABLE = "omni_release_queue"


def window_key(start: datetime) -> str:
    return start.astimezone(timezone.utc).isoformat(timespec="minutes")


def resolve_window(schedule: WindowSchedule, requested: str, now: datetime) -> datetime:
    """Return the start of the window a manifest is queued for: ``next``, or the exact start of a future window."""
    if requested == "next":
        return schedule.next_window(now).start
    try:
        start = datetime.fromisoformat(requested.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"param window {requested!r}: use next or the ISO 8601 start of a window") from None
    if start.tzinfo is None:
        raise ValueError(f"param window {requested!r}: give a time zone, e.g. 2026-12-06T02:00:00+01:00")
    window = schedule.window_at(start)
    if window is None or window.start != start.astimezone(timezone.utc):
        raise ValueError(f"param window {requested!r} is not the start of a release window "
                         f"({schedule.summary()}); the next one starts {schedule.next_window(now).start.isoformat()}")
    if start <= now:
        raise ValueError(f"param window {requested!r} has already started")
    return start


def queue_manifest(queue: dict[str, Any], start: datetime, entry: dict[str, Any]) -> dict[str, Any]:
    """Return the queue with ``entry`` queued for the window starting at ``start`` (replacing an earlier one)."""
    return {**queue, window_key(start): entry}


def take_manifest(queue: dict[str, Any], start: datetime) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Return (the entry queued for this window or None, the queue without it and without older windows)."""
    key = window_key(start)
    remaining = {k: v for k, v in queue.items() if k > key}
    return queue.get(key), remaining
