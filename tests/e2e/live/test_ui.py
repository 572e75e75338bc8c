"""The Airflow UI in a real browser: Debian's chromium, driven by Playwright (no browser download), against the live
Airflow of tests/e2e/live/conftest.py. What a release manager does from the UI: log in, open release_<service>, fill
the trigger form, trigger, watch the run succeed; and a bad image tag is refused by the form before anything runs.

The graph of the released run is kept as a test artifact in artifacts/ui/."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import boto3
import pytest

from omnisphere_release.params import IMAGE_TAG_RULE
from tests.e2e.helpers import push_image
from tests.e2e.live.helpers import wait_for_run

pytestmark = [pytest.mark.e2e, pytest.mark.ui]
REPO = Path(__file__).resolve().parents[3]
ARTIFACTS = REPO / "artifacts" / "ui"
CHROMIUM = os.environ.get("OMNI_CHROMIUM", "/usr/bin/chromium")
# Headless on a closed network: without the background-networking flags chromium keeps dialing Google's hosts.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DAG_ID = "release_auth-service"


@pytest.fixture(scope="module")
def browser_context() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium is not installed at {CHROMIUM}: install Debian's package (`apt-get install -y "
                    "chromium`, as .ci/run does) or point OMNI_CHROMIUM at a chromium binary")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="omni-chromium-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True,
            viewport={"width": 1600, "height": 1000})
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(browser_context, live_airflow):
    """A page logged in to the UI, as the admin of the live Airflow."""
    info = live_airflow.info
    page = browser_context.new_page()
    page.goto(f"{info['url']}/")
    page.get_by_label("Username").fill(info["username"])
    page.get_by_label("Password").fill(info["password"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"^(?!.*/auth/login).*$"))
    yield page
    page.close()


def open_trigger_form(page, url: str):
    page.goto(f"{url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger Dag").click()
    form = page.get_by_role("dialog")
    form.get_by_text("Run Parameters").wait_for()
    return form


def fill_release(form, image_tag: str, strategy: str, force_reason: str) -> None:
    form.locator("#element_image_tag").fill(image_tag)
    strategy_box = form.get_by_role("combobox").first  # the first select of the form is the strategy
    strategy_box.click()
    strategy_box.fill(strategy)
    strategy_box.press("Enter")
    assert form.locator("input[name=element_strategy]").get_attribute("value") == strategy
    form.locator("#element_window").fill("now")
    form.locator("#element_force_reason").fill(force_reason)


def run_count(live_airflow) -> int:
    return live_airflow.get(f"/dags/{DAG_ID}/dagRuns", params={"limit": 1}).json()["total_entries"]


def test_release_triggered_from_the_form_runs_to_success(page, live_airflow):
    url = live_airflow.info["url"]
    tag = f"8.0.{int(time.time())}"
    digest = push_image("auth-service", tag)  # CI built and pushed it
    form = open_trigger_form(page, url)
    fill_release(form, tag, "canary", "UI test: released from the trigger form")
    form.get_by_test_id("trigger-dag-submit").click()

    page.wait_for_url(re.compile(rf"/dags/{DAG_ID}/runs/[^/]+$"))
    run_id = unquote(page.url.rsplit("/runs/", 1)[1])
    # The run's own state badge sits next to its heading; the UI refreshes it while the run is active.
    badge = page.locator(f"h2:text-is('{run_id}') ~ [data-testid=state-badge]")
    deadline = time.monotonic() + 480
    while badge.inner_text().strip() not in ("Success", "Failed") and time.monotonic() < deadline:
        page.wait_for_timeout(2000)
    page.get_by_role("button", name="Show Graph").click()
    page.wait_for_timeout(2000)  # let the graph lay itself out
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / f"{DAG_ID}-graph.png"
    page.screenshot(path=str(screenshot))

    assert badge.inner_text().strip() == "Success", f"the UI shows {run_id} as {badge.inner_text()!r}"
    assert screenshot.stat().st_size > 10_000
    # What the form sent is what the release ran with, and the service now runs the tag typed into the form.
    run = wait_for_run(live_airflow, DAG_ID, run_id, timeout=30)
    assert run["state"] == "success"
    assert (run["conf"]["image_tag"], run["conf"]["strategy"], run["conf"]["window"]) == (tag, "canary", "now")
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    task_definition = ecs.describe_services(cluster="omnisphere", services=["auth-service"])["services"][0][
        "taskDefinition"]
    image = ecs.describe_task_definition(taskDefinition=task_definition)["taskDefinition"][
        "containerDefinitions"][0]["image"]
    assert image.endswith(f"@{digest}")  # deployed by the digest preflight checked, not by the tag


def test_bad_image_tag_is_refused_by_the_form_and_starts_nothing(page, live_airflow):
    runs_before = run_count(live_airflow)
    form = open_trigger_form(page, live_airflow.info["url"])
    fill_release(form, "not a tag!", "rolling", "UI test: a bad tag")
    form.get_by_test_id("trigger-dag-submit").click()

    message = form.get_by_text("Invalid input for param image_tag")
    message.wait_for()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    message.scroll_into_view_if_needed()  # the message sits at the top of the form
    page.screenshot(path=str(ARTIFACTS / f"{DAG_ID}-bad-tag.png"))
    text = form.inner_text()
    assert "'not a tag!' does not match" in text
    assert IMAGE_TAG_RULE in text  # the rule in words, beside the field
    assert form.is_visible(), "the form stays open so that the tag can be corrected"
    assert run_count(live_airflow) == runs_before
