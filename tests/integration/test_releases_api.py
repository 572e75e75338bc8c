"""The Releases app as Airflow's API server mounts it from the plugin: its JSON and page, read from a metadata database
that holds a released run, a rolled-back run, a run deferred in wait_for_window and a queued manifest; and the auth
manager deciding who reads what (401 without a credential, only readable services otherwise)."""

from __future__ import annotations

import io
import json
import uuid
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from omnisphere_release.catalog import load_catalog
from omnisphere_release.checks import schedule_of, window_schedule
from omnisphere_release.release_queue import QUEUE_VARIABLE, window_key
from omnisphere_release.report import build_report

# After every run other tests of the session make (the metadata database is shared): the page shows each service's
# last releases, and this module's must be among them.
T0 = datetime.now(timezone.utc) + timedelta(days=1)


def _report(run_id: str, outcome: str) -> dict:
    """A report as the report task builds it (report.build_report), for a release of omni/auth:v1 -> v2."""
    released = outcome == "released"
    states = {"preflight": "success", "backup": "success", "monitoring_gate": "success" if released else "failed",
              "finalize": "success" if released else "upstream_failed",
              "verify_rollback": "skipped" if released else "success"}
    preflight = {"service": "auth-service", "previous_image": "omni/auth:v1", "target_image": "omni/auth:v2",
                 "target_image_digest": "sha256:feed", "schema_version": 1, "target_version": 2}
    report = build_report(dag_id="release_auth-service", run_id=run_id, triggered_by="alice",
                          params={"service": "auth-service", "image_tag": "v2", "reason": "new sign-in"},
                          states=states, durations={"preflight": 3.0, "backup": 12.0, "monitoring_gate": 95.5},
                          outputs={"preflight": preflight},
                          after={"image": "omni/auth:v2" if released else "omni/auth:v1",
                                 "schema_version": 2 if released else 1},
                          stage_order=list(states))
    report = {**report, "stored_at": f"s3://omni-backups/auth-service/{run_id}/release-report.json"}
    if released:  # approved in production before it ran (the approve_release task records who and when)
        report["approval"] = {"approved_by": "erin", "approved_at": "2026-11-29T01:55:00+00:00"}
    report["bake"] = bake(failed=not released)
    return report


def bake(failed: bool) -> dict:
    """A bake as the monitoring gate records it: five minutes, one without data, a 5xx breach in the last one."""
    t0 = datetime(2026, 11, 29, 2, 0, tzinfo=timezone.utc)
    readings = [{"minute": (t0 + timedelta(minutes=i)).isoformat(), "error_rate": 0.002, "p99_ms": 180.0 + i,
                 "requests": 600} for i in range(5)]
    readings[2] = {**readings[2], "error_rate": None, "p99_ms": None, "requests": None}
    if failed:
        readings[4] = {**readings[4], "error_rate": 0.25, "p99_ms": 420.0}
    return {"started_at": t0.isoformat(), "ended_at": (t0 + timedelta(minutes=4, seconds=40)).isoformat(),
            "thresholds": {"max_error_rate": 0.01, "max_p99_latency_ms": 800, "missing_data_minutes": 3.0},
            "readings": readings, "failed_at": (t0 + timedelta(minutes=4, seconds=40)).isoformat() if failed else None,
            "verdict": "failed" if failed else "passed",
            "reason": "5xx error rate 25.00% (150 of 600 requests) is above the 1.00% threshold" if failed else None,
            "steps": [{"percent": 10, "started_at": t0.isoformat(),
                       "ended_at": (t0 + timedelta(minutes=2)).isoformat(), "verdict": "passed"},
                      {"percent": 100, "started_at": (t0 + timedelta(minutes=2)).isoformat(),
                       "ended_at": (t0 + timedelta(minutes=4, seconds=40)).isoformat(),
                       "verdict": "failed" if failed else "passed"}],
            # The gate's log check: what the new task set logged (text from the service: shown escaped).
            "log_errors": {"count": 2, "samples": ["ERROR <b>pool</b> exhausted", "ERROR retry"]} if failed else None}


@pytest.fixture(scope="module")
def metadata(airflow_db):
    """Write the runs the page reads (and remove them afterwards: the metadata database is the session's)."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.variable import Variable
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import delete, insert

    catalog = load_catalog()
    auth_window = schedule_of(catalog.get("auth-service")).next_window(datetime.now(timezone.utc))
    train_window = window_schedule(catalog.release_all_window).next_window(datetime.now(timezone.utc))
    runs = [  # dag_id, run_id, state, conf, user, {task_id: (state, try_number, duration)}, xcoms
        ("release_auth-service", "released_run", "success", {"image_tag": "v2"}, "alice",
         {"backup": ("success", 1, 12.0), "monitoring_gate": ("success", 1, 30.0), "finalize": ("success", 1, 1.0),
          "report": ("success", 1, 1.0)},
         {("report", "return_value"): _report("released_run", "released")}),
        ("release_auth-service", "rolled_back_run", "failed", {"image_tag": "v3"}, "bob",
         {"monitoring_gate": ("failed", 2, 95.5), "verify_rollback": ("success", 1, 2.0),
          "report": ("success", 1, 1.0)},
         {("report", "return_value"): _report("rolled_back_run", "rolled_back")}),
        ("release_auth-service", "waiting_run", "running", {"image_tag": "v4", "reason": "sunday fix"}, "carol",
         {"wait_for_window": ("deferred", 1, None)},
         {("wait_for_window", "window"): {"mode": "window", "window_start": auth_window.start.isoformat(),
                                          "window_end": auth_window.end.isoformat()}}),
        ("queue_release", "queue_run", "success", {}, "dave", {}, {}),
    ]
    with create_session() as session:
        for i, (dag_id, run_id, state, conf, user, tasks, xcoms) in enumerate(runs):
            run = DagRun(dag_id=dag_id, run_id=run_id, run_type="manual", conf=conf, state=state,
                         triggering_user_name=user, start_date=T0 + timedelta(hours=i),
                         run_after=T0 + timedelta(hours=i))
            if state != "running":
                run.end_date = T0 + timedelta(hours=i, minutes=10)
            session.add(run)
            session.flush()
            for task_id, (ti_state, try_number, duration) in tasks.items():
                session.execute(insert(TaskInstance).values(
                    id=uuid.uuid4(), dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=-1, state=ti_state,
                    try_number=try_number, duration=duration, pool="default_pool", pool_slots=1, max_tries=1))
            for (task_id, key), value in xcoms.items():
                session.execute(insert(XComModel).values(dag_run_id=run.id, task_id=task_id, map_index=-1, key=key,
                                                         dag_id=dag_id, run_id=run_id, value=value))
        # Other tests of the session leave the queue variable behind (set back to what they found): replace it.
        session.execute(delete(Variable).where(Variable.key == QUEUE_VARIABLE))
        session.add(Variable(key=QUEUE_VARIABLE, val=json.dumps({window_key(train_window.start): {
            "manifest": {"auth-service": "v5", "billing-service": "v7"}, "reason": "monthly train",
            "environment": "production", "queued_by": "queue_run"}})))
    yield {"auth_window": auth_window, "train_window": train_window}
    with create_session() as session:
        for model in (XComModel, TaskInstance):
            session.execute(delete(model).where(model.run_id.in_([r[1] for r in runs])))
        session.execute(delete(DagRun).where(DagRun.run_id.in_([r[1] for r in runs])))
        session.execute(delete(Variable).where(Variable.key == QUEUE_VARIABLE))


@pytest.fixture(scope="module")
def api(metadata):
    """Airflow's API server app, with the plugins of plugins/ (ours among them), and tokens of two users."""
    from airflow.api_fastapi.app import create_app, get_auth_manager, purge_cached_app
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    purge_cached_app()
    client = TestClient(create_app("core"))
    manager = get_auth_manager()
    client.tokens = {name: manager.generate_jwt(SimpleAuthManagerUser(username=name, role="viewer"))
                     for name in ("admin", "billing-only")}
    original = manager.filter_authorized_dag_ids

    # The simple auth manager lets every role read every DAG; a real one (FAB, Keycloak) grants DAGs one by one.
    # This one grants billing-only release_billing-service and nothing else.
    def filter_authorized_dag_ids(*, dag_ids, user, method="GET", team_name=None):
        if user.get_name() == "billing-only":
            return {d for d in dag_ids if d == "release_billing-service"}
        return original(dag_ids=dag_ids, user=user, method=method, team_name=team_name)

    manager.filter_authorized_dag_ids = filter_authorized_dag_ids  # type: ignore[method-assign]
    yield client
    purge_cached_app()


def get(api, path: str, user: str | None = "admin", **params):
    headers = {"Authorization": f"Bearer {api.tokens[user]}"} if user else {}
    return api.get(path, headers=headers, params=params)


@pytest.mark.parametrize("path", ["/omnisphere/api/calendar", "/omnisphere/api/releases", "/omnisphere/releases",
                                  "/omnisphere/api/report?dag_id=release_auth-service&run_id=released_run",
                                  "/omnisphere/api/bake?dag_id=release_auth-service&run_id=rolled_back_run",
                                  "/omnisphere/api/bake.svg?dag_id=release_auth-service&run_id=rolled_back_run",
                                  "/omnisphere/release?dag_id=release_auth-service&run_id=rolled_back_run",
                                  "/omnisphere/api/overview",
                                  "/omnisphere/api/schema?service=auth-service", "/omnisphere/schema?service=auth-service"])
def test_an_anonymous_request_gets_401(api, path):
    assert api.get(path).status_code == 401
    assert api.get(path, headers={"Authorization": "Bearer not-a-jwt"}).status_code in (401, 403)


def test_the_ui_cookie_authenticates_like_the_api(api):
    api.cookies.set("_token", api.tokens["admin"])
    try:
        assert api.get("/omnisphere/api/calendar").status_code == 200
    finally:
        api.cookies.clear()


def test_the_plugin_puts_releases_in_the_navigation(api):
    plugins = get(api, "/api/v2/plugins").json()["plugins"]
    ours = next(p for p in plugins if p["name"] == "omnisphere_release")
    assert [(v["name"], v["href"], v["destination"], v["nav_top_level"]) for v in ours["external_views"]] == [
        ("Releases", "/omnisphere/releases", "nav", True)]
    assert ours["fastapi_apps"][0]["url_prefix"] == "/omnisphere"


def test_the_calendar_shows_every_window_the_waiting_release_and_the_queued_manifest(api, metadata):
    response = get(api, "/omnisphere/api/calendar", weeks=2)
    assert response.status_code == 200, response.text
    cal = response.json()
    assert cal["services"] == load_catalog().names and cal["release_all"] is True
    assert {w["scope"] for w in cal["windows"]} == {*load_catalog().names, "release_all"}
    auth = next(w for w in cal["windows"] if w["scope"] == "auth-service")
    assert auth["start"] == metadata["auth_window"].start.isoformat()
    assert [(r["run_id"], r["image_tag"], r["triggered_by"], r["reason"]) for r in auth["releases"]] == [
        ("waiting_run", "v4", "carol", "sunday fix")]
    train = next(w for w in cal["windows"] if w["scope"] == "release_all")
    assert train["manifest"]["manifest"] == {"auth-service": "v5", "billing-service": "v7"}
    assert train["manifest"]["queued_by"] == "dave" and train["manifest"]["reason"] == "monthly train"


def test_the_history_of_a_service_tells_each_release(api):
    response = get(api, "/omnisphere/api/releases", service="auth-service")
    assert response.status_code == 200, response.text
    lines = {r["run_id"]: r for r in response.json()["releases"]["auth-service"]}
    # Other tests of the session release auth-service too (the metadata database is shared); this module's runs are
    # the newest, so they are among the last ten shown.
    assert {"released_run", "rolled_back_run", "waiting_run"} <= lines.keys()
    assert lines["released_run"]["outcome"] == "released"
    assert lines["released_run"]["target"]["image_digest"] == "sha256:feed"
    bad = lines["rolled_back_run"]
    assert bad["outcome"] == "rolled_back" and bad["before"]["image"] == bad["after"]["image"] == "omni/auth:v1"
    assert bad["slowest_stage"] == {"stage": "monitoring_gate", "seconds": 95.5}
    assert bad["duration_seconds"] == 600.0 and bad["triggered_by"] == "alice"
    assert bad["links"]["failed_task_log"] == ("/dags/release_auth-service/runs/rolled_back_run/tasks/"
                                               "monitoring_gate?try_number=2")
    assert lines["waiting_run"]["outcome"] == "in_progress"
    report = get(api, bad["links"]["report"].split("?")[0], dag_id="release_auth-service", run_id="rolled_back_run")
    assert report.status_code == 200 and report.json()["outcome"] == "rolled_back"
    markdown = get(api, "/omnisphere/api/report", dag_id="release_auth-service", run_id="rolled_back_run",
                   format="md")
    assert "FAILED and ROLLED BACK" in markdown.text


def test_a_user_sees_only_the_services_whose_dags_they_may_read(api):
    cal = get(api, "/omnisphere/api/calendar", user="billing-only").json()
    assert cal["services"] == ["billing-service"] and cal["release_all"] is False
    assert {w["scope"] for w in cal["windows"]} == {"billing-service"}
    assert all(not w["releases"] and not w["manifest"] for w in cal["windows"])
    assert list(get(api, "/omnisphere/api/releases", user="billing-only").json()["releases"]) == ["billing-service"]
    assert get(api, "/omnisphere/api/releases", user="billing-only", service="auth-service").status_code == 403
    assert get(api, "/omnisphere/api/report", user="billing-only", dag_id="release_auth-service",
               run_id="released_run").status_code == 403
    page = get(api, "/omnisphere/releases", user="billing-only").text
    assert "billing-service" in page and "auth-service" not in page
    assert get(api, "/omnisphere/api/schema", user="billing-only", service="auth-service").status_code == 403


def test_a_schema_history_that_cannot_be_read_says_through_which_connection(api, monkeypatch):
    # This test's Airflow has no connection for the service's database (tests/integration/test_releases_schema.py
    # reads a real one): the answer names the service and the connection, and is no 500.
    monkeypatch.delenv("AIRFLOW_CONN_OMNI_PG_AUTH_SERVICE", raising=False)
    response = get(api, "/omnisphere/api/schema", service="auth-service")
    assert response.status_code == 502
    assert "schema history of auth-service through connection 'omni_pg_auth_service'" in response.json()["detail"]


def test_the_page_shows_the_calendar_and_the_history(api):
    response = get(api, "/omnisphere/releases")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    for expected in ("waiting_run", "monthly train", "omni/auth:v2", "FAILED and ROLLED BACK", "Intl.DateTimeFormat",
                     "log of monitoring_gate"):
        assert expected in page
    assert get(api, "/omnisphere/api/releases", service="no-such-service").status_code == 404


def test_omni_release_calendar_prints_the_windows_and_what_waits_in_them(api, metadata, monkeypatch):
    from fastapi.testclient import TestClient

    from omnisphere_release import client

    # The CLI's HTTP client, answered by the API server app in this process instead of over a socket.
    monkeypatch.setattr(client.httpx, "Client", lambda base_url, timeout: TestClient(api.app, base_url=base_url))
    monkeypatch.setenv("OMNI_AIRFLOW_URL", "http://testserver")
    monkeypatch.setenv("OMNI_AIRFLOW_TOKEN", api.tokens["admin"])
    out = io.StringIO()
    assert client.main(["calendar", "--weeks", "2", "--tz", "Europe/Paris"], out=out) == client.EXIT_OK
    text = out.getvalue()
    auth_start = metadata["auth_window"].start.astimezone(ZoneInfo("Europe/Paris"))
    assert f"{auth_start:%a %d %b %H:%M}-" in text
    assert f"(times in {datetime.now(ZoneInfo('Europe/Paris')):%Z})" in text
    assert "    waiting: auth-service v4 by carol - sunday fix [release_auth-service/waiting_run]" in text
    assert "    queued manifest: auth-service v5, billing-service v7 by dave - monthly train" in text
    assert client.main(["calendar", "--tz", "Mars/Olympus"], out=io.StringIO()) == client.EXIT_BAD_INPUT
    monkeypatch.setenv("OMNI_AIRFLOW_TOKEN", "expired-or-forged")
    assert client.main(["calendar"], out=io.StringIO()) == client.EXIT_UNREACHABLE


def test_the_history_says_who_approved_and_how_each_bake_went(api):
    lines = {r["run_id"]: r for r in get(api, "/omnisphere/api/releases", service="auth-service").json()[
        "releases"]["auth-service"]}
    good, bad = lines["released_run"], lines["rolled_back_run"]
    assert (good["approved_by"], good["approved_at"]) == ("erin", "2026-11-29T01:55:00+00:00")
    assert bad["approved_by"] is None
    assert good["bake"]["verdict"] == "passed" and good["bake"]["minutes_without_data"] == 1
    assert bad["bake"]["verdict"] == "failed" and bad["bake"]["max_error_rate"] == 0.25
    assert bad["bake"]["failed_at"] == "2026-11-29T02:04:40+00:00" and "25.00%" in bad["bake"]["reason"]
    assert bad["links"]["bake_chart"] == ("/omnisphere/api/bake.svg?dag_id=release_auth-service&"
                                          "run_id=rolled_back_run")
    assert lines["waiting_run"]["bake"] is None and lines["waiting_run"]["links"]["bake_chart"] is None


def test_the_bake_is_served_as_json_as_the_gate_recorded_it_in_the_report_or_its_xcom(api):
    response = get(api, "/omnisphere/api/bake", dag_id="release_auth-service", run_id="rolled_back_run")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["bake"] == bake(failed=True) and body["note"] is None and body["outcome"] == "rolled_back"
    # A run whose report has no bake (the gate was not reached) says so, and is no error.
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import delete, insert, update

    with create_session() as session:
        row = session.scalar(XComModel.get_many(run_id="released_run", dag_ids="release_auth-service",
                                                task_ids="report", key="return_value"))
        saved = XComModel.deserialize_value(row)
        session.execute(update(XComModel).where(XComModel.dag_run_id == row.dag_run_id, XComModel.task_id == "report")
                        .values(value={k: v for k, v in saved.items() if k != "bake"}))
    try:
        none = get(api, "/omnisphere/api/bake", dag_id="release_auth-service", run_id="released_run").json()
        assert none["bake"] is None and none["note"] == "no bake recorded"
        chart = get(api, "/omnisphere/api/bake.svg", dag_id="release_auth-service", run_id="released_run")
        assert chart.status_code == 404 and "no bake recorded" in chart.json()["detail"]
        page = get(api, "/omnisphere/release", dag_id="release_auth-service", run_id="released_run")
        assert page.status_code == 200 and "No bake recorded" in page.text
        # A report without the bake, of a run whose gate recorded one (its XCom "bake"): the gate's record is shown.
        with create_session() as session:
            session.execute(insert(XComModel).values(dag_run_id=row.dag_run_id, task_id="monitoring_gate",
                                                     map_index=-1, key="bake", dag_id="release_auth-service",
                                                     run_id="released_run", value=bake(failed=False)))
        from_gate = get(api, "/omnisphere/api/bake", dag_id="release_auth-service", run_id="released_run").json()
        assert from_gate["bake"] == bake(failed=False) and from_gate["note"] is None
        assert get(api, "/omnisphere/api/bake.svg", dag_id="release_auth-service",
                   run_id="released_run").status_code == 200
        lines = get(api, "/omnisphere/api/releases", service="auth-service").json()["releases"]["auth-service"]
        assert next(r for r in lines if r["run_id"] == "released_run")["bake"]["verdict"] == "passed"
    finally:
        with create_session() as session:
            session.execute(delete(XComModel).where(XComModel.dag_run_id == row.dag_run_id,
                                                    XComModel.task_id == "monitoring_gate"))
            session.execute(update(XComModel).where(XComModel.dag_run_id == row.dag_run_id,
                                                    XComModel.task_id == "report").values(value=saved))


def test_the_bake_chart_draws_the_thresholds_and_the_failure_in_the_viewers_zone(api):
    response = get(api, "/omnisphere/api/bake.svg", dag_id="release_auth-service", run_id="rolled_back_run",
                   tz="Europe/Paris")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/svg+xml"
    svg = response.text
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "matplotlib" in svg.lower()
    for expected in ("auth-service rolled_back_run: bake FAILED", "threshold 1.00 %", "threshold 800 ms",
                     "failed 03:04:40",  # 02:04:40 UTC in Paris
                     "minute (Europe/Paris)", "no data", "10 %"):
        assert expected in svg, expected
    assert get(api, "/omnisphere/api/bake.svg", dag_id="release_auth-service", run_id="rolled_back_run",
               tz="Mars/Olympus").status_code == 422
    assert get(api, "/omnisphere/api/bake.svg", user="billing-only", dag_id="release_auth-service",
               run_id="rolled_back_run").status_code == 403
    assert get(api, "/omnisphere/api/bake", dag_id="release_auth-service", run_id="no_such_run").status_code == 404


def test_the_release_page_shows_the_release_its_chart_and_its_minutes(api):
    response = get(api, "/omnisphere/release", dag_id="release_auth-service", run_id="rolled_back_run")
    assert response.status_code == 200, response.text
    page = response.text
    for expected in ("FAILED and ROLLED BACK", 'data-chart="/omnisphere/api/bake.svg?dag_id=release_auth-service&amp;'
                     "run_id=rolled_back_run", "25.00%", "5 readings, one a minute", "no data", "Canary steps",
                     "log of monitoring_gate", "Error lines the new tasks logged during the bake: 2",
                     "ERROR &lt;b&gt;pool&lt;/b&gt; exhausted"):
        assert expected in page, expected
    approved = get(api, "/omnisphere/release", dag_id="release_auth-service", run_id="released_run").text
    assert "approved by erin" in approved
    assert get(api, "/omnisphere/release", dag_id="release_auth-service", run_id="nope").status_code == 404


def test_the_overview_gives_each_service_its_state_last_releases_and_next_window(api, metadata):
    response = get(api, "/omnisphere/api/overview", weeks=2)
    assert response.status_code == 200, response.text
    overview = response.json()
    assert [line["service"] for line in overview["services"]] == load_catalog().names
    auth = next(line for line in overview["services"] if line["service"] == "auth-service")
    assert auth["running"]["image"] == "omni/auth:v1" and auth["running"]["by_run"] == "rolled_back_run"
    assert auth["last_release"]["outcome"] == "rolled_back" and auth["recent_outcomes"][-2:] == [
        "released", "rolled_back"]
    assert auth["next_window"]["start"] == metadata["auth_window"].start.isoformat()
    assert [w["run_id"] for w in auth["waiting"]] == ["waiting_run"] and auth["in_progress"] == ["waiting_run"]
    assert auth["needs_attention"] is False
    assert overview["release_all"]["next_queued"]["manifest"] == {"auth-service": "v5", "billing-service": "v7"}
    page = get(api, "/omnisphere/releases").text
    assert "Services at a glance" in page and "release_all</b> next window" in page
    assert get(api, "/omnisphere/api/overview", user="billing-only").json()["release_all"] is None
