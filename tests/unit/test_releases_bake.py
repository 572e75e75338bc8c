"""The bake chart's engine, without Airflow: the bake as the monitoring gate records it in the report, checked field
by field, summarised for the history line, and drawn by matplotlib as SVG (thresholds, the failure, the gaps)."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from omnisphere_release.ui import bake as bake_module
from omnisphere_release.ui.bake import BakeError, bake_of, bake_summary, check_bake, inline_svg, render_chart

T0 = datetime(2026, 11, 29, 1, 0, tzinfo=timezone.utc)


def a_bake(minutes: int = 6, failed: bool = True) -> dict:
    readings = [{"minute": (T0 + timedelta(minutes=i)).isoformat(), "error_rate": 0.001, "p99_ms": 150.0,
                 "requests": 500} for i in range(minutes)]
    readings[1] = {**readings[1], "error_rate": None, "p99_ms": None, "requests": None}
    if failed:
        readings[-1] = {**readings[-1], "error_rate": 0.3}
    end = T0 + timedelta(minutes=minutes - 1, seconds=30)
    return {"started_at": T0.isoformat(), "ended_at": end.isoformat(),
            "thresholds": {"max_error_rate": 0.02, "max_p99_latency_ms": 900, "missing_data_minutes": 2.0},
            "readings": readings, "failed_at": end.isoformat() if failed else None,
            "verdict": "failed" if failed else "passed",
            "reason": "5xx error rate 30.00% ($ cost: 150 of 500 requests) is above the 2.00% threshold"
            if failed else None, "steps": []}


def test_a_report_without_a_bake_has_none_and_no_summary():
    assert bake_of(None) is None and bake_of({"outcome": "refused"}) is None and bake_of({"bake": "x"}) is None
    assert bake_summary(None) is None


def test_the_summary_gives_the_verdict_the_worst_minute_and_the_minutes_without_data():
    summary = bake_summary(a_bake())
    assert summary["verdict"] == "failed" and summary["failed_at"] == "2026-11-29T01:05:30+00:00"
    assert (summary["minutes"], summary["minutes_without_data"]) == (6, 1)
    assert (summary["max_error_rate"], summary["max_p99_ms"]) == (0.3, 150.0)
    assert summary["log_errors"] is None  # no log check in the catalog for this service
    assert bake_summary({**a_bake(), "log_errors": {"count": 7, "samples": ["ERROR boom"]}})["log_errors"] == 7


@pytest.mark.parametrize(("change", "says"), [
    (lambda b: b.pop("readings"), "has no 'readings'"),
    (lambda b: b["readings"][3].update(minute="soon"), "bake.readings[3].minute is 'soon', not an ISO 8601 time"),
    (lambda b: b["readings"][0].update(p99_ms="fast"), "bake.readings[0].p99_ms is 'fast', not a number or null"),
    (lambda b: b["thresholds"].pop("max_p99_latency_ms"), "bake.thresholds.max_p99_latency_ms is missing"),
    (lambda b: b.update(failed_at="yesterday"), "bake.failed_at is 'yesterday'"),
])
def test_a_bake_off_the_contract_is_refused_naming_the_field(change, says):
    broken = copy.deepcopy(a_bake())
    change(broken)
    with pytest.raises(BakeError, match=r".*") as error:
        check_bake(broken)
    assert says in str(error.value)
    with pytest.raises(BakeError):
        render_chart(broken, title="x")


def test_the_chart_draws_both_metrics_against_their_thresholds_and_marks_the_failure():
    svg = render_chart(a_bake(), title="auth-service run-1", tz=ZoneInfo("Europe/Paris"))
    assert svg.startswith("<?xml") and "</svg>" in svg
    for text in ("auth-service run-1: bake FAILED", "threshold 2.00 %", "threshold 900 ms", "5xx rate (%)",
                 "p99 (ms)", "no data", "failed 02:05:30", "minute (Europe/Paris)"):
        assert text in svg, text
    assert "$ cost" in svg  # a dollar in a reason is text, not mathematics
    assert inline_svg(svg).startswith("<svg")


def test_a_passed_bake_has_no_failure_mark_and_steps_are_labelled():
    bake = a_bake(failed=False)
    bake["steps"] = [{"percent": 25, "started_at": T0.isoformat(), "ended_at": None, "verdict": "passed"}]
    svg = render_chart(bake, title="billing-service run-2")
    assert "bake PASSED" in svg and "failed " not in svg and "25 %" in svg and "minute (UTC)" in svg


def test_a_bake_that_failed_before_its_first_reading_still_draws():
    bake = {**a_bake(), "readings": [], "steps": []}
    assert "bake FAILED" in render_chart(bake, title="notification-service run-3")


def test_the_same_chart_is_drawn_once(monkeypatch):
    bake = a_bake(minutes=4)
    first = render_chart(bake, title="cached")
    monkeypatch.setattr(bake_module, "_draw", lambda *a: pytest.fail("drawn again"))
    assert render_chart(copy.deepcopy(bake), title="cached") == first
    with pytest.raises(pytest.fail.Exception):
        render_chart(bake, title="cached", tz=ZoneInfo("Asia/Tokyo"))  # another zone is another chart
