"""One line per service for the release manager planning the next window: what it runs now, how its last releases
went, when its next window opens and what waits for it, and whether something needs a person first.

No Airflow here, and no query of its own: it reads the calendar (:func:`omnisphere_release.ui.calendar.build_calendar`)
and the histories (:func:`omnisphere_release.ui.history.service_history`) the page already has.
"""

from __future__ import annotations

from typing import Any

from omnisphere_release.ui.calendar import RELEASE_ALL
from omnisphere_release.ui.history import IN_PROGRESS

FINISHED = ("released", "rolled_back", "rollback_incomplete", "failed")
# A rollback that did not finish leaves the service in a state nobody intended: nothing should be released on top.
NEEDS_A_PERSON = "rollback_incomplete"


def _running(releases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return what the newest finished release left the service running (its report's "after")."""
    for release in releases:
        if release["outcome"] in FINISHED and (release.get("after") or {}).get("image"):
            return {**release["after"], "since": release.get("ended"), "by_run": release["run_id"]}
    return None


def service_overview(calendar: dict[str, Any], history: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Return each service's line (catalog order) and release_all's next window with its queued manifest."""
    first_window: dict[str, dict[str, Any]] = {}
    waiting: dict[str, list[dict[str, Any]]] = {}
    for window in calendar["windows"]:
        first_window.setdefault(window["scope"], window)
        for release in window["releases"]:
            waiting.setdefault(release["service"], []).append({**release, "window_start": window["start"]})
    for item in calendar["elsewhere"]:
        if item["kind"] == "release":
            waiting.setdefault(item["service"], []).append(item)
    lines = []
    for service in calendar["services"]:
        releases = history.get(service, [])
        finished = [r for r in releases if r["outcome"] in FINISHED]
        last = finished[0] if finished else None
        window = first_window.get(service)
        lines.append({
            "service": service,
            "running": _running(releases),
            "last_release": {key: last[key] for key in ("run_id", "outcome", "outcome_text", "started", "ended",
                                                        "image_tag", "bake")} | {"detail": last["links"]["detail"]}
            if last else None,
            # Oldest first, as a strip reads left to right: the last ten outcomes.
            "recent_outcomes": [r["outcome"] for r in reversed(finished)],
            "in_progress": [r["run_id"] for r in releases if r["outcome"] == IN_PROGRESS],
            "next_window": {"start": window["start"], "end": window["end"], "summary": window["summary"]}
            if window else None,
            "waiting": waiting.get(service, []),
            "needs_attention": bool(last and last["outcome"] == NEEDS_A_PERSON),
        })
    train = first_window.get(RELEASE_ALL)
    queued = next((w["manifest"] for w in calendar["windows"] if w["scope"] == RELEASE_ALL and w.get("manifest")),
                  None)
    return {"services": lines,
            "release_all": {"next_window": {"start": train["start"], "end": train["end"], "summary": train["summary"]}
                            if train else None, "next_queued": queued} if calendar["release_all"] else None}
