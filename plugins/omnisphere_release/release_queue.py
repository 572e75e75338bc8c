"""The release queue: manifests (service -> image tag) waiting for a release_all window, kept in an Airflow Variable.

Operators queue a manifest with the ``queue_release`` DAG (UI or API); at each window, the scheduled ``release_all``
run takes the manifest queued for that window, if any, and releases it. Pure functions here; which window a manifest
may be queued for is a window rule (:func:`omnisphere_release.checks.queued_window_start`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

QUEUE_VARIABLE = "omni_release_queue"


def window_key(start: datetime) -> str:
    return start.astimezone(timezone.utc).isoformat(timespec="minutes")


def queue_manifest(queue: dict[str, Any], start: datetime, entry: dict[str, Any]) -> dict[str, Any]:
    """Return the queue with ``entry`` queued for the window starting at ``start`` (replacing an earlier one)."""
    return {**queue, window_key(start): entry}


def take_manifest(queue: dict[str, Any], start: datetime) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Return (the entry queued for this window or None, the queue without it and without older windows)."""
    key = window_key(start)
    remaining = {k: v for k, v in queue.items() if k > key}
    return queue.get(key), remaining
