"""The Releases page's engines, without Airflow: the calendar (windows and what waits for them) and the history lines."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from omnisphere_release.catalog import load_catalog
from omnisphere_release.ui.calendar import WaitingRelease, build_calendar
from omnisphere_release.ui.history import RunRecord, TaskRecord, release_entry, service_history
from omnisphere_release.ui.overview import service_overview
from omnisphere_release.ui.page import render_page, render_schema_page

# A Thursday: auth-service's next window is Sunday 02:00 Paris (01:00 UTC), billing's Tuesday 03:00 Paris,
# notification's every day 01:30 UTC; release_all's Sunday 02:00 Paris.
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
SUNDAY = "2026-11-29T01:00:00+00:00"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def waiting(service: str, start: str | None, mode: str = "window", **extra) -> WaitingRelease:
    return WaitingRelease(dag_id=f"release_{service}", run_id=f"manual__{service}", service=service,
                          window_start=start, window_end=None, mode=mode, image_tag="v2", triggered_by="alice",
                          reason="fix sign-in", **extra)


def test_calendar_lists_each_services_windows_in_order_with_release_all(catalog):
    cal = build_calendar(catalog, now=NOW, weeks=1, services=set(catalog.names), show_release_all=True,
                         waiting=[], queue={})
    starts = [w["start"] for w in cal["windows"]]
    assert starts == sorted(starts)
    by_scope: dict[str, list[str]] = {}
    for w in cal["windows"]:
        by_scope.setdefault(w["scope"], []).append(w["start"])
    assert by_scope["auth-service"] == [SUNDAY]
    assert by_scope["release_all"] == [SUNDAY]
    assert by_scope["billing-service"] == ["2026-12-01T02:00:00+00:00"]
    assert len(by_scope["notification-service"]) == 7
    auth = next(w for w in cal["windows"] if w["scope"] == "auth-service")
    assert auth["end"] == "2026-11-29T03:00:00+00:00" and auth["summary"] == "Sun 02:00-04:00 Europe/Paris"


def test_a_window_open_now_is_listed_first(catalog):
    now = datetime(2026, 11, 29, 1, 30, tzinfo=timezone.utc)
    cal = build_calendar(catalog, now=now, weeks=1, services={"auth-service"}, show_release_all=False,
                         waiting=[], queue={})
    assert cal["windows"][0]["start"] == SUNDAY


def test_waiting_releases_and_the_queued_manifest_land_in_their_windows(catalog):
    queue = {"2026-11-29T01:00+00:00": {"manifest": {"auth-service": "v2"}, "reason": "train", "queued_by": "r1",
                                        "queued_by_user": "bob"},
             "2027-06-06T00:00+00:00": {"manifest": {"billing-service": "v9"}, "reason": "later"}}
    cal = build_calendar(
        catalog, now=NOW, weeks=2, services=set(catalog.names), show_release_all=True, queue=queue,
        waiting=[waiting("auth-service", "2026-11-29T01:00:00+00:00"),
                 waiting("billing-service", "2026-11-27T09:00:00+00:00", mode="forced", force_reason="hotfix")])
    auth = next(w for w in cal["windows"] if w["scope"] == "auth-service" and w["start"] == SUNDAY)
    assert [(r["run_id"], r["image_tag"], r["triggered_by"], r["reason"]) for r in auth["releases"]] == [
        ("manual__auth-service", "v2", "alice", "fix sign-in")]
    train = next(w for w in cal["windows"] if w["scope"] == "release_all" and w["start"] == SUNDAY)
    assert train["manifest"]["manifest"] == {"auth-service": "v2"} and train["manifest"]["queued_by"] == "bob"
    # Nothing waiting is hidden: a forced release and a manifest for a window beyond the horizon are listed apart.
    assert [(e["kind"], e.get("service"), e["window_start"]) for e in cal["elsewhere"]] == [
        ("release", "billing-service", "2026-11-27T09:00:00+00:00"), ("manifest", None, "2027-06-06T00:00+00:00")]


def test_a_viewer_sees_only_the_services_they_may_read(catalog):
    cal = build_calendar(catalog, now=NOW, weeks=1, services={"billing-service"}, show_release_all=False,
                         queue={"2026-11-29T01:00+00:00": {"manifest": {"auth-service": "v2"}}},
                         waiting=[waiting("auth-service", SUNDAY), waiting("billing-service", None)])
    assert {w["scope"] for w in cal["windows"]} == {"billing-service"}
    assert cal["services"] == ["billing-service"] and cal["release_all"] is False
    assert [e.get("service") for e in cal["elsewhere"]] == ["billing-service"]  # its start is not known


def report(outcome: str, stages: list[tuple[str, float]]) -> dict:
    return {"outcome": outcome, "triggered_by": "alice", "reason": "r", "stored_at": "s3://b/k.json",
            "before": {"image": "repo/auth:v1", "schema_version": 3},
            "target": {"image": "repo/auth:v2", "image_digest": "sha256:abc", "schema_version": 4},
            "after": {"image": "repo/auth:v1", "schema_version": 3},
            "stages": [{"stage": s, "state": "success", "seconds": sec} for s, sec in stages]}


def record(state: str | None, rep: dict | None, tasks: list[TaskRecord] | None = None,
           start: datetime | None = NOW, run_id: str = "manual__1") -> RunRecord:
    return RunRecord(dag_id="release_auth-service", run_id=run_id, state=state, start=start,
                     end=start + timedelta(minutes=12) if start and state in ("success", "failed") else None,
                     triggered_by="ci", conf={"image_tag": "v2"}, tasks=tasks or [], report=rep)


def test_a_rolled_back_release_shows_before_target_outcome_slowest_stage_and_links():
    rep = report("rolled_back", [("wait_for_window", 3600.0), ("backup", 40.0), ("monitoring_gate", 300.0),
                                 ("rollback_ecs", 90.0)])
    tasks = [TaskRecord("smoke_test", "success", 1, 5.0), TaskRecord("monitoring_gate", "failed", 2, 300.0),
             TaskRecord("release_failed", "failed", 1, 0.1)]
    entry = release_entry(record("failed", rep, tasks), "/base", "/base/omnisphere")
    assert entry["outcome"] == "rolled_back" and entry["outcome_text"].startswith("FAILED and ROLLED BACK")
    assert entry["before"]["image"] == "repo/auth:v1"
    assert entry["target"] == {"image": "repo/auth:v2", "image_digest": "sha256:abc", "schema_version": 4}
    assert entry["duration_seconds"] == 720.0
    assert entry["slowest_stage"] == {"stage": "monitoring_gate", "seconds": 300.0}  # not the wait for the window
    assert entry["triggered_by"] == "alice" and entry["failed_task"] == "monitoring_gate"
    assert entry["links"] == {
        "run": "/base/dags/release_auth-service/runs/manual__1",
        "detail": "/base/omnisphere/release?dag_id=release_auth-service&run_id=manual__1",
        "report": "/base/omnisphere/api/report?dag_id=release_auth-service&run_id=manual__1",
        "bake": None, "bake_chart": None,  # this report has no bake
        "report_stored_at": "s3://b/k.json",
        "failed_task_log": "/base/dags/release_auth-service/runs/manual__1/tasks/monitoring_gate?try_number=2"}


def test_runs_without_a_report_say_what_is_known_and_history_is_newest_first():
    released = record("success", report("released", [("ecs_deploy", 60.0)]), run_id="old", start=NOW)
    running = record("running", None, [TaskRecord("backup", "success", 1, 33.0)], run_id="new",
                     start=NOW + timedelta(days=1))
    queued = record("queued", None, run_id="waiting", start=None)
    lines = service_history([released, running, queued], "", "/omnisphere")
    assert [(x["run_id"], x["outcome"]) for x in lines] == [("waiting", "in_progress"), ("new", "in_progress"),
                                                            ("old", "released")]
    assert lines[1]["slowest_stage"] == {"stage": "backup", "seconds": 33.0}
    assert lines[1]["links"]["report"] is None and lines[1]["target"]["image"] == "v2"


def test_the_page_escapes_what_people_typed_and_shows_times_for_the_viewers_zone(catalog):
    evil = "<script>alert(1)</script>"
    cal = build_calendar(catalog, now=NOW, weeks=1, services={"auth-service"}, show_release_all=False, queue={},
                         waiting=[WaitingRelease("release_auth-service", "r1", "auth-service", SUNDAY, None,
                                                 "window", "v2", "alice", evil)])
    rep = report("rollback_incomplete", [("backup", 1.0)])
    rep["reason"] = evil
    history = {"auth-service": service_history([record("failed", rep)], "", "/omnisphere")}
    html = render_page(cal, history, service_overview(cal, history))
    assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert f'<time datetime="{SUNDAY}">' in html and "Intl.DateTimeFormat" in html
    assert "FAILED, ROLLBACK INCOMPLETE" in html
    assert '<code title="repo/auth:v1">auth:v1</code> →<br><code title="repo/auth:v2">auth:v2</code>' in html


def test_the_page_puts_what_will_run_and_each_next_window_first_and_folds_the_empty_ones(catalog):
    later = "2026-12-06T01:00:00+00:00"  # auth-service's second window
    cal = build_calendar(catalog, now=NOW, weeks=2, services=set(catalog.names), show_release_all=False, queue={},
                         waiting=[waiting("auth-service", later)])
    html = render_page(cal, {}, service_overview(cal, {}))
    shown, folded = html.split("<details>")
    assert f'<time datetime="{SUNDAY}">' in shown and f'<time datetime="{later}">' in shown
    assert "manual__auth-service" in shown
    notification = [w["start"] for w in cal["windows"] if w["scope"] == "notification-service"]
    assert f'<time datetime="{notification[0]}">' in shown
    assert all(f'<time datetime="{start}">' in folded for start in notification[1:])
    billing = [w["start"] for w in cal["windows"] if w["scope"] == "billing-service"]
    assert len(billing) == 2 and f'<time datetime="{billing[1]}">' in folded
    assert f"{(len(notification) - 1) + (len(billing) - 1)} more windows with nothing queued yet" in folded


def test_the_schema_page_links_a_migration_to_the_run_that_applied_it():
    entry = {"version": 3, "name": "create_api_tokens", "applied_at": "2026-11-26T10:00:00+00:00",
             "applied_by": "dag=release_auth-service run=manual__2026-11-26T10:00:00+00:00"}
    html = render_schema_page({"service": "auth-service", "current_version": "3", "baseline": None,
                               "applied": [entry], "dirty": [], "drift": [], "pending": [],
                               "log": [{"at": entry["applied_at"], "version": 3, "name": "create_api_tokens",
                                        "action": "applied", "by": "cli", "reason": "", "execution_ms": 4}]})
    assert ('<a href="../dags/release_auth-service/runs/manual__2026-11-26T10%3A00%3A00%2B00%3A00" target="_top">'
            "dag=release_auth-service run=manual__2026-11-26T10:00:00+00:00</a>") in html
    assert "<td>cli</td>" in html and "No dirty version, no drift." in html


def test_the_overview_says_what_runs_how_the_last_releases_went_and_what_waits_for_the_next_window(catalog):
    released = report("released", [("backup", 1.0)])
    released["after"] = {"image": "repo/auth@sha256:" + "ab" * 32, "schema_version": 4}
    broken = report("rollback_incomplete", [("backup", 1.0)])
    broken["after"] = {"image": None, "schema_version": None}  # verify_rollback could not tell
    records = [record("success", released, run_id="r1", start=NOW - timedelta(days=3)),
               record("failed", report("rolled_back", []), run_id="r2", start=NOW - timedelta(days=2)),
               record("failed", broken, run_id="r3", start=NOW - timedelta(days=1)),
               record("running", None, run_id="r4", start=None)]
    history = {"auth-service": service_history(records, "", "/omnisphere")}
    cal = build_calendar(catalog, now=NOW, weeks=1, services={"auth-service"}, show_release_all=False, queue={},
                         waiting=[waiting("auth-service", SUNDAY)])
    overview = service_overview(cal, history)
    assert overview["release_all"] is None
    (auth,) = overview["services"]
    assert auth["recent_outcomes"] == ["released", "rolled_back", "rollback_incomplete"]  # oldest first
    assert auth["last_release"]["run_id"] == "r3" and auth["needs_attention"] is True
    # The newest finished release that says what it left running: r2 rolled back to v1.
    assert (auth["running"]["image"], auth["running"]["by_run"]) == ("repo/auth:v1", "r2")
    assert auth["next_window"]["start"] == SUNDAY and [w["run_id"] for w in auth["waiting"]] == [
        "manual__auth-service"]
    assert auth["in_progress"] == ["r4"]
    html = render_page(cal, history, service_overview(cal, history))
    assert "rollback incomplete: act first" in html and "class=attention" in html
    released_line = service_history([records[0]], "", "/omnisphere")
    page = render_page(cal, {"auth-service": released_line}, service_overview(cal, {"auth-service": released_line}))
    assert f">auth@{'ab' * 6}…</code>" in page  # a digest reference, shortened; whole on hover


def test_a_release_says_who_approved_or_rejected_it_and_when(catalog):
    approved, rejected = report("released", []), report("rejected", [])
    approved["approval"] = {"required": True, "outcome": "approved", "approved_by": "erin",
                            "approved_at": "2026-11-29T00:55:00+00:00"}
    rejected["approval"] = {"required": True, "outcome": "rejected", "approved_by": None, "rejected_by": "<frank>",
                            "rejected_at": "2026-11-29T00:56:00+00:00"}
    lines = service_history([record("success", approved, run_id="a", start=NOW),
                             record("failed", rejected, run_id="r", start=NOW + timedelta(hours=1))], "", "/omnisphere")
    assert (lines[1]["approved_by"], lines[1]["approved_at"]) == ("erin", "2026-11-29T00:55:00+00:00")
    assert (lines[0]["approved_by"], lines[0]["rejected_by"]) == (None, "<frank>")
    cal = build_calendar(catalog, now=NOW, weeks=1, services={"auth-service"}, show_release_all=False, queue={},
                         waiting=[])
    html = render_page(cal, {"auth-service": lines}, service_overview(cal, {"auth-service": lines}))
    assert 'approved by erin <span class=muted><time datetime="2026-11-29T00:55:00+00:00">' in html
    assert "rejected by &lt;frank&gt;" in html
