"""The release calendar: the next maintenance windows of each service and of release_all, and what will run in each.

No Airflow here: the caller hands over the releases waiting in ``wait_for_window`` and the release queue (both read
from Airflow's metadata by :mod:`omnisphere_release.ui.metadata`), and the services the viewer may see.
Times are UTC ISO 8601 strings; the page shows them in the viewer's time zone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

from omnisphere_release.catalog import Catalog, MaintenanceWindow
from omnisphere_release.checks import window_schedule
from omnisphere_release.release_queue import window_key

RELEASE_ALL = "release_all"
MAX_WINDOWS_PER_SCOPE = 60  # a window every hour for weeks would otherwise fill the page


@dataclass(frozen=True)
class WaitingRelease:
    """A release run deferred in ``wait_for_window``: when it may start, and what it will release."""

    dag_id: str
    run_id: str
    service: str
    window_start: str | None  # ISO 8601, as the task decided it; None when the decision is not recorded
    window_end: str | None
    mode: str  # "window" or "forced" (outside the windows, with a force_reason)
    image_tag: str | None
    triggered_by: str | None
    reason: str
    force_reason: str = ""


@dataclass
class CalendarWindow:
    scope: str  # a service name, or release_all
    start: datetime
    end: datetime
    summary: str  # the window as the catalog says it: "Sun 02:00-04:00 Europe/Paris"
    releases: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None  # release_all only: the manifest queued for this window


def _windows(scope: str, window: MaintenanceWindow, now: datetime, until: datetime) -> list[CalendarWindow]:
    schedule = window_schedule(window)
    found: list[CalendarWindow] = []
    # The window open now comes first: a release waiting for it is about to run.
    current = schedule.window_at(now) or schedule.next_window(now)
    while current.start < until and len(found) < MAX_WINDOWS_PER_SCOPE:
        found.append(CalendarWindow(scope, current.start, current.end, schedule.summary()))
        current = schedule.next_window(current.start + timedelta(seconds=1))
    return found


def _instant(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def build_calendar(catalog: Catalog, *, now: datetime, weeks: float, services: set[str], show_release_all: bool,
                   waiting: list[WaitingRelease], queue: dict[str, Any]) -> dict[str, Any]:
    """Return the windows of ``services`` (and of release_all when ``show_release_all``) from ``now`` for ``weeks``,
    earliest first, each with the releases waiting for it and, for release_all, the manifest queued for it.

    A waiting release whose start falls in none of the listed windows (forced outside them, or further ahead) is
    listed under ``elsewhere`` with its own start, so that nothing waiting is hidden; so is a queued manifest whose
    window is not listed.
    """
    until = now + timedelta(weeks=weeks)
    windows: list[CalendarWindow] = []
    visible = [s for s in catalog.services if s.name in services]
    for service in visible:
        windows += _windows(service.name, service.maintenance_window, now, until)
    if show_release_all and catalog.release_all_window is not None:
        windows += _windows(RELEASE_ALL, catalog.release_all_window, now, until)
    windows.sort(key=lambda w: (w.start, w.scope != RELEASE_ALL, w.scope))

    elsewhere: list[dict[str, Any]] = []
    for release in sorted(waiting, key=lambda r: (r.window_start or "", r.service)):
        if release.service not in services:
            continue
        start = _instant(release.window_start)
        home = next((w for w in windows if w.scope == release.service and start is not None
                     and w.start <= start < w.end), None)
        if home is not None and release.mode != "forced":
            home.releases.append(asdict(release))
        else:
            elsewhere.append({"kind": "release", **asdict(release)})

    if show_release_all:
        by_key = {window_key(w.start): w for w in windows if w.scope == RELEASE_ALL}
        for key, entry in sorted(queue.items()):
            if not isinstance(entry, dict):
                continue
            target = by_key.get(key)
            queued = {"window_start": key, "manifest": entry.get("manifest") or {}, "reason": entry.get("reason", ""),
                      "environment": entry.get("environment") or "",
                      "queued_by_run": entry.get("queued_by"), "queued_by": entry.get("queued_by_user")}
            if target is not None:
                target.manifest = queued
            else:
                elsewhere.append({"kind": "manifest", **queued})

    return {"generated_at": now.isoformat(timespec="seconds"), "until": until.isoformat(timespec="seconds"),
            "services": [s.name for s in visible], "release_all": show_release_all,
            "windows": [{**asdict(w), "start": w.start.isoformat(), "end": w.end.isoformat()} for w in windows],
            "elsewhere": elsewhere}


def render_text(calendar: dict[str, Any], tz: tzinfo | None = None) -> str:
    """Return the calendar (as build_calendar returns it) for a terminal, times in ``tz`` (default: the local zone)."""

    def at(iso: str | None, fmt: str = "%a %d %b %H:%M") -> str:
        when = _instant(iso)
        return when.astimezone(tz).strftime(fmt) if when else "start unknown"

    def release(r: dict[str, Any]) -> str:
        forced = f" (forced: {r['force_reason']})" if r.get("force_reason") else ""
        reason = f" - {r['reason']}" if r.get("reason") else ""
        return (f"{r['service']} {r.get('image_tag')} by {r.get('triggered_by') or 'unknown'}{reason}{forced} "
                f"[{r['dag_id']}/{r['run_id']}]")

    def manifest(m: dict[str, Any]) -> str:
        services = ", ".join(f"{s} {tag}" for s, tag in sorted(m["manifest"].items()))
        reason = f" - {m['reason']}" if m.get("reason") else ""
        return f"queued manifest: {services} by {m.get('queued_by') or 'unknown'}{reason}"

    zone = datetime.now(timezone.utc).astimezone(tz).tzname()
    lines = [f"Maintenance windows until {at(calendar['until'])} (times in {zone})", ""]
    for w in calendar["windows"]:
        lines.append(f"{at(w['start'])}-{at(w['end'], '%H:%M')}  {w['scope']:<24} {w['summary']}")
        lines += [f"    waiting: {release(r)}" for r in w["releases"]]
        if w.get("manifest"):
            lines.append(f"    {manifest(w['manifest'])}")
    if calendar["elsewhere"]:
        lines += ["", "Waiting outside these windows:"]
        lines += [f"  {at(e.get('window_start'))}  " + (release(e) if e["kind"] == "release" else manifest(e))
                  for e in calendar["elsewhere"]]
    return "\n".join(lines)
