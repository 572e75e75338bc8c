"""The Releases page (#18) on the live Airflow's API server, mounted there by the plugin: the calendar answers every
catalog service to the admin and nothing without a credential; and, in chromium, after a good release and a
rolled-back one (its bake fails on 5xx: the devstack's ``-errors`` image), the page shows both in the history, the
release waiting for its window in the calendar and the chart of the failed bake. Screenshots go to artifacts/ui/."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from omnisphere_release.catalog import load_catalog
from omnisphere_release.checks import schedule_of
from tests.e2e.helpers import push_image
from tests.e2e.live.helpers import task_states, wait_for_run

# The UI test's chromium, logged in as the live Airflow's admin (one browser for the package's UI tests).
from tests.e2e.live.test_ui import ARTIFACTS, browser_context, page  # noqa: F401

pytestmark = pytest.mark.e2e
GOOD_SERVICE, BAD_SERVICE, WAITING_SERVICE = "billing-service", "notification-service", "auth-service"


def test_the_calendar_answers_the_catalogs_services_and_401_without_a_token(live_airflow):
    base = live_airflow.info["url"]
    # The live catalog is include/services.yaml with shorter bakes: the same services.
    names = load_catalog().names
    response = httpx.get(f"{base}/omnisphere/api/calendar", headers={"Authorization":
                                                                      live_airflow.headers["Authorization"]}, timeout=30)
    assert response.status_code == 200, response.text
    calendar = response.json()
    assert calendar["services"] == names and calendar["release_all"] is True
    assert {w["scope"] for w in calendar["windows"]} == {*names, "release_all"}
    for path in ("/omnisphere/api/calendar", "/omnisphere/releases", "/omnisphere/api/overview"):
        assert httpx.get(f"{base}{path}", timeout=30).status_code == 401, path


def trigger(live_airflow, service: str, conf: dict) -> str:
    response = live_airflow.post(f"/dags/release_{service}/dagRuns", json={"logical_date": None, "conf": conf})
    assert response.status_code == 200, response.text
    return response.json()["dag_run_id"]


def patiently(call, timeout: float):
    """Call ``call(time_left)`` again when the live API server is too busy to answer within the client's timeout (a
    shared 2-core host under several test sessions): a slow answer is not the failure these tests look for."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(max(1.0, deadline - time.monotonic()))
        except httpx.TimeoutException:
            if time.monotonic() > deadline:
                raise


def wait_for_release(live_airflow, service: str, run_id: str, timeout: float) -> str:
    return patiently(lambda left: wait_for_run(live_airflow, f"release_{service}", run_id, timeout=left),
                     timeout)["state"]


def wait_for_task_state(live_airflow, dag_id: str, run_id: str, task_id: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (states := patiently(lambda _: task_states(live_airflow, dag_id, run_id), timeout)).get(task_id) != state:
        assert time.monotonic() < deadline, f"{dag_id} {run_id}: {task_id} not {state} after {timeout}s: {states}"
        time.sleep(2)


@pytest.fixture(scope="module")
def releases(live_airflow):
    """A good release of billing-service and, at the same time, one of notification-service whose bake fails on 5xx
    and rolls back; then a release of auth-service waiting for its next window (failed by hand afterwards, so that
    it never runs)."""
    stamp = int(time.time())
    good, bad, waiting = f"9.0.{stamp}", f"9.1.{stamp}-errors", f"9.2.{stamp}"
    released = {GOOD_SERVICE: good, BAD_SERVICE: bad, WAITING_SERVICE: waiting}
    for service, tag in released.items():
        push_image(service, tag)
    # Rolling for both: the page is under test here, not the services' own strategies (blue/green, canary).
    forced = {"window": "now", "force_reason": "Releases page test", "strategy": "rolling"}
    runs = {service: trigger(live_airflow, service, {**forced, "image_tag": tag, "reason": f"page test {tag}"})
            for service, tag in ((GOOD_SERVICE, good), (BAD_SERVICE, bad))}
    assert wait_for_release(live_airflow, GOOD_SERVICE, runs[GOOD_SERVICE], timeout=600) == "success"
    assert wait_for_release(live_airflow, BAD_SERVICE, runs[BAD_SERVICE], timeout=600) == "failed"
    states = task_states(live_airflow, f"release_{BAD_SERVICE}", runs[BAD_SERVICE])
    assert states["monitoring_gate"] == "failed", f"the bake was to fail, the rest to pass: {states}"

    # The start of a window at least an hour ahead: the run waits for it, deferred, whatever the time of the test.
    window = schedule_of(load_catalog().get(WAITING_SERVICE)).next_window(datetime.now(timezone.utc)
                                                                          + timedelta(hours=1))
    waiting_dag = f"release_{WAITING_SERVICE}"
    waiting_run = trigger(live_airflow, WAITING_SERVICE, {"image_tag": waiting, "window": window.start.isoformat(),
                                                          "reason": "page test: for its window"})
    try:
        wait_for_task_state(live_airflow, waiting_dag, waiting_run, "wait_for_window", "deferred", timeout=180)
        yield {"good": runs[GOOD_SERVICE], "good_tag": good, "bad": runs[BAD_SERVICE], "bad_tag": bad,
               "waiting": waiting_run, "waiting_tag": waiting, "window": window}
    finally:
        live_airflow.patch(f"/dags/{waiting_dag}/dagRuns/{waiting_run}", json={"state": "failed"})


def shot(page, name: str) -> None:  # noqa: F811 - page is the UI test's fixture
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    assert (ARTIFACTS / name).stat().st_size > 10_000, name


@pytest.mark.ui
def test_the_page_shows_both_releases_the_waiting_one_and_the_failed_bakes_chart(page, live_airflow, releases):  # noqa: F811
    url = live_airflow.info["url"]
    # Where a release manager finds it: the Releases button of the navigation bar, the page in the UI's frame.
    page.goto(f"{url}/")
    page.get_by_role("link", name="Releases").click()
    page.wait_for_url(re.compile(r"/plugin/releases$"))
    frame = page.frame_locator("iframe").first
    frame.get_by_role("heading", name="Services at a glance").wait_for()
    shot(page, "releases-in-the-ui.png")

    page.goto(f"{url}/omnisphere/releases")

    def history_row(service: str, tag: str):
        table = page.locator("h3", has_text=service).locator("xpath=following-sibling::table[1]")
        return table.locator("tr", has_text=tag)

    good_row, bad_row = history_row(GOOD_SERVICE, releases["good_tag"]), history_row(BAD_SERVICE, releases["bad_tag"])
    assert "RELEASED: every stage passed" in good_row.inner_text()
    assert "FAILED and ROLLED BACK" in bad_row.inner_text()
    assert "log of monitoring_gate" in bad_row.inner_text()

    # The calendar: the waiting release in its service's window (shown first: something will run in it).
    calendar = page.locator("h2", has_text="Calendar").locator("xpath=following-sibling::table[1]")
    window_row = calendar.locator("tr", has_text=releases["waiting"])
    assert WAITING_SERVICE in window_row.inner_text() and releases["waiting_tag"] in window_row.inner_text()
    assert window_row.locator("time").first.get_attribute("datetime") == releases["window"].start.isoformat()
    overview = page.locator("h2", has_text="Services at a glance").locator("xpath=following-sibling::table[1]")
    assert releases["waiting_tag"] in overview.locator("tr", has_text=WAITING_SERVICE).inner_text()

    shot(page, "releases-page.png")

    # The failed bake: its line says when and why, and its chart opens under the row.
    assert "failed at" in bad_row.inner_text(), bad_row.inner_text()
    bad_row.get_by_role("link", name="chart").click()
    chart = bad_row.locator("xpath=following-sibling::tr[1]").locator("img.chart")
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=chart.element_handle())
    assert "tz=" in (chart.get_attribute("src") or "")
    chart.scroll_into_view_if_needed()
    shot(page, "releases-page-chart.png")

    # The release's own page: the chart, the thresholds, the minutes; the SVG itself says what it draws.
    bad_row.get_by_role("link", name="details").click()
    page.wait_for_url(re.compile(r"/omnisphere/release\?"))
    chart = page.locator("img.chart")
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=chart.element_handle())
    assert "Thresholds: 5xx rate" in page.inner_text("body")
    svg = page.request.get(f"{url}{chart.get_attribute('src')}").text()  # with the page's session cookie
    for drawn in ("bake FAILED", "threshold", "failed ", "5xx rate (%)", "p99 (ms)"):
        assert drawn in svg, drawn
    shot(page, "release-bake.png")

    # And the same as JSON, for scripts.
    bake = live_airflow.get(f"{url}/omnisphere/api/bake", params={"dag_id": f"release_{BAD_SERVICE}",
                                                                   "run_id": releases["bad"]}).json()
    assert bake["bake"]["verdict"] == "failed" and bake["bake"]["failed_at"]
    assert any(r["error_rate"] and r["error_rate"] > bake["bake"]["thresholds"]["max_error_rate"]
               for r in bake["bake"]["readings"])
