"""A release's bake, as the monitoring gate recorded it in the release report (its ``bake`` key), and its chart.

The chart is drawn on the server by matplotlib (its SVG backend, no pyplot and no display): the 5xx rate and the p99
latency per minute, each against the service's threshold, the requests per minute below them (a minute without data
is a gap, which the gate fails on after ``missing_data_minutes``), the canary steps as shaded spans and the moment
of failure as a red line. No Airflow here; matplotlib is imported by the first chart, not by the page.

The report is written once, by the report task: a chart for the same bake and time zone is the same SVG, so the last
few are kept in memory and a second look costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
import threading
from collections import OrderedDict
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

NO_BAKE = "no bake recorded"
CACHE_SIZE = 64
_cache: OrderedDict[str, str] = OrderedDict()
# matplotlib's font cache and text layout are shared by every figure of the process: one chart at a time.
_render_lock = threading.Lock()

THRESHOLD_COLOR, FAILURE_COLOR, LINE_COLOR, DATA_COLOR = "#b91c1c", "#b91c1c", "#1d4ed8", "#9ca3af"


class BakeError(ValueError):
    """The report's ``bake`` is not what the monitoring gate writes; the message names the field."""


def bake_of(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return the report's bake, or None when the run recorded none (no gate reached, or a report from before it)."""
    bake = (report or {}).get("bake")
    return bake if isinstance(bake, dict) else None


def _instant(value: Any, field: str) -> datetime:
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise BakeError(f"the report's bake.{field} is {value!r}, not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _number(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BakeError(f"the report's bake.{field} is {value!r}, not a number or null")
    return float(value)


def check_bake(bake: dict[str, Any]) -> None:
    """Raise :class:`BakeError` naming the first field that does not follow the monitoring gate's contract."""
    for field in ("started_at", "thresholds", "readings", "verdict"):
        if field not in bake:
            raise BakeError(f"the report's bake has no {field!r}")
    _instant(bake["started_at"], "started_at")
    for field in ("ended_at", "failed_at"):
        if bake.get(field):
            _instant(bake[field], field)
    thresholds = bake["thresholds"]
    if not isinstance(thresholds, dict):
        raise BakeError("the report's bake.thresholds is not an object")
    for field in ("max_error_rate", "max_p99_latency_ms"):
        if _number(thresholds.get(field), f"thresholds.{field}") is None:
            raise BakeError(f"the report's bake.thresholds.{field} is missing")
    if not isinstance(bake["readings"], list):
        raise BakeError("the report's bake.readings is not a list")
    for i, reading in enumerate(bake["readings"]):
        if not isinstance(reading, dict):
            raise BakeError(f"the report's bake.readings[{i}] is not an object")
        _instant(reading.get("minute"), f"readings[{i}].minute")
        for field in ("error_rate", "p99_ms", "requests"):
            _number(reading.get(field), f"readings[{i}].{field}")
    for i, step in enumerate(bake.get("steps") or []):
        _instant(step.get("started_at") if isinstance(step, dict) else None, f"steps[{i}].started_at")


def bake_summary(bake: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return what the history line says of a bake: verdict, when it failed and why, its span, its worst minute."""
    if bake is None:
        return None
    readings = [r for r in bake.get("readings") or [] if isinstance(r, dict)]
    rates = [r["error_rate"] for r in readings if isinstance(r.get("error_rate"), (int, float))]
    p99s = [r["p99_ms"] for r in readings if isinstance(r.get("p99_ms"), (int, float))]
    return {"verdict": bake.get("verdict"), "reason": bake.get("reason"), "failed_at": bake.get("failed_at"),
            "started_at": bake.get("started_at"), "ended_at": bake.get("ended_at"), "minutes": len(readings),
            "minutes_without_data": sum(1 for r in readings if not r.get("requests")),
            "max_error_rate": max(rates) if rates else None, "max_p99_ms": max(p99s) if p99s else None,
            "thresholds": bake.get("thresholds"), "steps": len(bake.get("steps") or []),
            # The gate's log check, where the catalog has one: error lines the new task set logged during the bake.
            "log_errors": (bake.get("log_errors") or {}).get("count") if isinstance(bake.get("log_errors"), dict)
            else None}


def _key(bake: dict[str, Any], title: str, tz: tzinfo) -> str:
    document = json.dumps([bake, title, str(tz)], sort_keys=True, default=str)
    return hashlib.sha256(document.encode()).hexdigest()


def render_chart(bake: dict[str, Any], *, title: str, tz: tzinfo = timezone.utc) -> str:
    """Return the bake as an SVG document, times in ``tz``; raise :class:`BakeError` on a bake off the contract."""
    check_bake(bake)
    key = _key(bake, title, tz)
    with _render_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        svg = _draw(bake, title, tz)
        _cache[key] = svg
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return svg


def warm_up() -> None:
    """Import the chart's part of matplotlib (about a second, more on a busy host) so that the first chart a user
    opens does not pay it: the pages run this after their answer is sent."""
    from matplotlib.backends import backend_svg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401


def _plain(text: Any) -> str:
    """Text shown as typed: matplotlib would read ``$...$`` as mathematics."""
    return str(text).replace("$", r"\$")


def _draw(bake: dict[str, Any], title: str, tz: tzinfo) -> str:
    import io

    import matplotlib
    from matplotlib import dates as mdates
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    # Text stays text (smaller, selectable, findable by a test); ids do not change between two renders.
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "omnisphere-bake", "font.size": 9})

    thresholds = bake["thresholds"]
    max_rate = float(thresholds["max_error_rate"]) * 100
    max_p99 = float(thresholds["max_p99_latency_ms"])
    readings = sorted(bake["readings"], key=lambda r: _instant(r["minute"], "minute"))
    minutes = [_instant(r["minute"], "minute") for r in readings]
    started = _instant(bake["started_at"], "started_at")
    ended = _instant(bake["ended_at"], "ended_at") if bake.get("ended_at") else None
    failed = _instant(bake["failed_at"], "failed_at") if bake.get("failed_at") else None
    left = min([started, *minutes])
    right = max([x for x in (ended, failed, minutes[-1] + timedelta(minutes=1) if minutes else None) if x]
                or [started + timedelta(minutes=1)])

    def values(field: str, scale: float = 1.0) -> list[float]:
        return [r[field] * scale if r.get(field) is not None else math.nan for r in readings]

    # Each reading holds for its minute: a step from the minute's start to the next one's.
    edges = [*minutes, minutes[-1] + timedelta(minutes=1)] if minutes else []

    def stairs(ax: Any, ys: list[float], **kwargs: Any) -> None:
        if edges:
            ax.step(edges, [*ys, ys[-1]], where="post", **kwargs)

    figure = Figure(figsize=(10.5, 5.6))
    rate_ax, p99_ax, req_ax = figure.subplots(3, 1, sharex=True, height_ratios=[3, 3, 1.6])
    # Fixed margins, room on the right for the legends: a layout engine would double the time a chart takes.
    figure.subplots_adjust(left=0.07, right=0.83, top=0.89, bottom=0.1, hspace=0.12)
    stairs(rate_ax, values("error_rate", 100), color=LINE_COLOR, linewidth=1.8, label="5xx rate")
    rate_ax.axhline(max_rate, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.2,
                    label=f"threshold {max_rate:.2f} %")
    rate_ax.set_ylabel("5xx rate (%)")
    stairs(p99_ax, values("p99_ms"), color=LINE_COLOR, linewidth=1.8, label="p99")
    p99_ax.axhline(max_p99, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.2, label=f"threshold {max_p99:.0f} ms")
    p99_ax.set_ylabel("p99 (ms)")
    for ax, top in ((rate_ax, max_rate), (p99_ax, max_p99)):
        ax.set_ylim(bottom=0, top=max([top * 1.25, *[v * 1.1 for v in ax.get_ylim()[1:]]]))
        ax.grid(True, color="#e5e7eb", linewidth=0.6)
    counts = values("requests")
    if minutes:
        req_ax.bar(minutes, [0 if math.isnan(c) else c for c in counts], width=timedelta(seconds=54), align="edge",
                   color="#d1d5db", label="requests")
        gaps = [m for m, c in zip(minutes, counts, strict=True) if math.isnan(c) or c == 0]
        if gaps:
            req_ax.plot([m + timedelta(seconds=30) for m in gaps], [0] * len(gaps), "x", color=THRESHOLD_COLOR,
                        label="no data")
    req_ax.set_ylabel("requests")
    req_ax.grid(True, axis="y", color="#e5e7eb", linewidth=0.6)

    for i, step in enumerate(bake.get("steps") or []):
        start = _instant(step["started_at"], f"steps[{i}].started_at")
        end = _instant(step["ended_at"], f"steps[{i}].ended_at") if step.get("ended_at") else right
        for ax in (rate_ax, p99_ax, req_ax):
            ax.axvspan(start, end, color="#eef2ff" if i % 2 == 0 else "#e0e7ff", zorder=0, linewidth=0)
        rate_ax.annotate(f"{step.get('percent')} %", xy=(start, 1), xycoords=("data", "axes fraction"),
                         xytext=(3, -11), textcoords="offset points", color="#4338ca", fontsize=8)
    if failed is not None:
        for ax in (rate_ax, p99_ax, req_ax):
            ax.axvline(failed, color=FAILURE_COLOR, linewidth=2)
        rate_ax.annotate(f"failed {failed.astimezone(tz):%H:%M:%S}", xy=(failed, 1), xycoords=("data", "axes fraction"),
                         xytext=(-4, -11), textcoords="offset points", ha="right", color=FAILURE_COLOR,
                         fontweight="bold")
    rate_ax.set_xlim(left, right)
    locator = mdates.AutoDateLocator(tz=tz, minticks=3, maxticks=10)
    req_ax.xaxis.set_major_locator(locator)
    # A bake of a few minutes (a devstack's, a canary step's) needs its seconds.
    short = (right - left) <= timedelta(minutes=5)
    req_ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if short else "%H:%M", tz=tz))
    req_ax.set_xlabel(f"minute ({tz}), from {started.astimezone(tz):%a %d %b %Y %H:%M}")
    for ax in (rate_ax, p99_ax, req_ax):  # beside the plot, where no line or step label can hide them
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)

    verdict = str(bake.get("verdict") or "unknown").upper()
    headline = f"{title}: bake {verdict}"
    if bake.get("reason"):
        headline += "\n" + textwrap.shorten(str(bake["reason"]), 140)
    figure.suptitle(_plain(headline), color=FAILURE_COLOR if failed is not None or verdict == "FAILED" else "#047857",
                    fontsize=10)
    out = io.StringIO()
    FigureCanvasSVG(figure).print_svg(out, metadata={"Date": None, "Creator": "OmniSphere releases (matplotlib)"})
    return out.getvalue()


def inline_svg(svg: str) -> str:
    """Return the SVG without its XML prologue, to put it in an HTML page."""
    return svg[svg.index("<svg"):]
