"""Four eyes in the Airflow UI, in a real browser (Debian's chromium, driven by Playwright), against the live Airflow of
tests/e2e/live/conftest.py: the admin triggers a release in an environment that requires approval; it waits at
approve_release, holding no worker slot; the admin, who triggered it, is refused (by the API and in the UI); a second
user, the service's approver, reads the plan on the task's Required Actions page and approves it there; the release
runs to success and its report says who approved and when. And from a shell: omni-release shows the waiting release
with the link, refuses the admin's own answer, and an approver's rejection ends the run FAILED (exit 5), nothing
changed.

Screenshots of the request and of the refusal are kept as test artifacts in artifacts/ui/."""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.e2e.helpers import push_image
from tests.e2e.live.conftest import APPROVAL_ENVIRONMENT, APPROVER
from tests.e2e.live.helpers import client_xcom, task_states, wait_for_run
from tests.e2e.live.test_ui import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS

# Two minutes of live approvals in a browser: in `make test-long` (CI runs it after `make test`), not in `make test`.
pytestmark = [pytest.mark.e2e, pytest.mark.ui, pytest.mark.long]
DAG_ID = "release_auth-service"
TASK_ID = "approve_release"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium is not installed at {CHROMIUM}: install Debian's package (`apt-get install -y "
                    "chromium`, as .ci/run does) or point OMNI_CHROMIUM at a chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def logged_in(browser, url: str, username: str, password: str):
    """A page of a browser context of its own (its own session cookie), logged in to the UI as ``username``."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(60_000)
    page = context.new_page()
    page.goto(f"{url}/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"^(?!.*/auth/login).*$"))
    return page


def required_actions(page, url: str, run_id: str) -> None:
    page.goto(f"{url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/tasks/{TASK_ID}/required_actions")
    page.get_by_role("button", name="Approve", exact=True).wait_for()


def wait_for_state(live_airflow, run_id: str, wanted: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while (state := task_states(live_airflow, DAG_ID, run_id).get(TASK_ID)) != wanted:
        assert state not in ("failed", "upstream_failed", "success"), f"{TASK_ID} is {state}, expected {wanted}"
        assert time.monotonic() < deadline, f"{TASK_ID} still {state} after {timeout:.0f}s"
        time.sleep(2)


def test_a_second_user_approves_from_the_ui_and_the_release_runs(browser, live_airflow):
    url, info = live_airflow.info["url"], live_airflow.info
    tag = f"8.1.{int(time.time())}"
    push_image("auth-service", tag)
    triggered = live_airflow.post(f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {
        "image_tag": tag, "environment": APPROVAL_ENVIRONMENT, "window": "now", "bake_minutes": 0.1,
        "force_reason": "UI test: four eyes", "reason": "approval UI test"}})
    assert triggered.status_code == 200, triggered.text
    run_id = triggered.json()["dag_run_id"]
    wait_for_state(live_airflow, run_id, "awaiting_input")

    detail_path = f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{TASK_ID}/-1/hitlDetails"
    detail = live_airflow.get(detail_path).json()
    assert detail["subject"] == f"Release auth-service {tag} to {APPROVAL_ENVIRONMENT}?"
    assert [u["name"] for u in detail["assigned_users"]] == [APPROVER]  # admin is an approver, but triggered it
    assert "### Rollback plan" in detail["body"] and "FORCED outside the maintenance window" in detail["body"]
    # The person who triggered it may not approve it: the API refuses, and the request stays open.
    own = live_airflow.patch(detail_path, json={"chosen_options": ["Approve"], "params_input": {"comment": "mine"}})
    assert own.status_code == 403, own.text
    assert "is not a respondent" in own.json()["detail"]

    admin = logged_in(browser, url, info["username"], info["password"])
    required_actions(admin, url, run_id)
    admin.get_by_role("button", name="Approve", exact=True).click()
    admin.get_by_text("Access Denied").wait_for()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    admin.screenshot(path=str(ARTIFACTS / f"{DAG_ID}-approval-refused.png"))
    admin.context.close()
    assert task_states(live_airflow, DAG_ID, run_id)[TASK_ID] == "awaiting_input"
    assert task_states(live_airflow, DAG_ID, run_id)["backup"] in (None, "none")  # nothing started

    approver = logged_in(browser, url, APPROVER, info["approver"]["password"])
    required_actions(approver, url, run_id)
    page_text = approver.inner_text("body")
    assert f"Release auth-service {tag} to {APPROVAL_ENVIRONMENT}?" in page_text
    assert "Migrations" in page_text and "Who may answer" in page_text
    approver.screenshot(path=str(ARTIFACTS / f"{DAG_ID}-approval-request.png"), full_page=True)
    approver.locator("#element_comment").fill("UI test: plan read, approved")
    approver.get_by_role("button", name="Approve", exact=True).click()
    approver.get_by_text(f"{TASK_ID} response successful").wait_for()
    approver.context.close()

    run = wait_for_run(live_airflow, DAG_ID, run_id, timeout=480)
    report = client_xcom(live_airflow, DAG_ID, run_id, "report")
    failed = {t: s for t, s in task_states(live_airflow, DAG_ID, run_id).items() if s != "success"}
    assert run["state"] == "success", f"{report.get('summary')}; not successful: {failed}"
    assert report["outcome"] == "released"
    approval = report["approval"]
    assert (approval["required"], approval["approved_by"], approval["comment"]) == (
        True, APPROVER, "UI test: plan read, approved")
    assert approval["approved_at"] and approval["refused_answers"] == []  # the 403 never reached the task
    assert (report["audit"]["triggered_by"], report["audit"]["approved_by"]) == (info["username"], APPROVER)
    assert report["audit"]["force_reason"] == "UI test: four eyes"


def test_omni_release_shows_the_wait_and_an_approver_rejects_from_a_shell(live_airflow, monkeypatch, capsys):
    """CI triggers a release that needs an approver and follows it; the approver answers from a shell. A rejection
    ends the run FAILED with nothing changed, and omni-release says so with exit code 5."""
    import boto3

    from omnisphere_release import client

    info = live_airflow.info
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    running = ecs.describe_services(cluster="omnisphere", services=["auth-service"])["services"][0]["taskDefinition"]
    tag = f"8.2.{int(time.time())}"
    push_image("auth-service", tag)
    monkeypatch.setenv("OMNI_AIRFLOW_URL", info["url"])
    monkeypatch.delenv("OMNI_AIRFLOW_TOKEN", raising=False)
    monkeypatch.setenv("OMNI_AIRFLOW_USERNAME", info["username"])
    monkeypatch.setenv("OMNI_AIRFLOW_PASSWORD", info["password"])
    out = io.StringIO()
    assert client.main(["trigger", "auth-service", "--image-tag", tag, "--environment", APPROVAL_ENVIRONMENT,
                        "--window", "now", "--force-reason", "CLI test: four eyes", "--bake-minutes", "0.1"],
                       out=out) == client.EXIT_OK
    run = out.getvalue().split("Triggered ", 1)[1].split()[0]
    run_id = run.split("/", 1)[1]
    wait_for_state(live_airflow, run_id, "awaiting_input")

    out = io.StringIO()
    assert client.main(["status", run], out=out) == client.EXIT_OK
    assert f"awaiting approval by {APPROVER}" in out.getvalue()
    assert f"{url_of(info)}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/tasks/{TASK_ID}/required_actions" \
        in out.getvalue()
    assert client.main(["approve", run, "--comment", "my own"], out=io.StringIO()) == client.EXIT_BAD_INPUT
    assert "is not a respondent" in capsys.readouterr().err  # the admin triggered it

    monkeypatch.setenv("OMNI_AIRFLOW_USERNAME", APPROVER)
    monkeypatch.setenv("OMNI_AIRFLOW_PASSWORD", info["approver"]["password"])
    out = io.StringIO()
    assert client.main(["reject", run, "--comment", "CLI test: not tonight"], out=out) == client.EXIT_OK
    assert "Rejected: the release ends here, with nothing changed" in out.getvalue()
    assert wait_for_run(live_airflow, DAG_ID, run_id, timeout=300)["state"] == "failed"
    assert client.main(["status", run], out=io.StringIO()) == client.EXIT_REJECTED
    report = client_xcom(live_airflow, DAG_ID, run_id, "report")
    assert (report["outcome"], report["approval"]["rejected_by"]) == ("rejected", APPROVER)
    assert report["approval"]["comment"] == "CLI test: not tonight"
    assert ecs.describe_services(cluster="omnisphere", services=["auth-service"])["services"][0][
        "taskDefinition"] == running


def url_of(info: dict) -> str:
    return str(info["url"]).rstrip("/")
