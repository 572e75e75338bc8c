"""The DAGs under a real Airflow (API server, scheduler, DAG processor, triggerer) on the devstack, driven through the
REST API as CI and the UI do."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import boto3
import pytest

from tests.e2e.helpers import push_image
from tests.e2e.live.helpers import client_xcom, task_states, wait_for_run
from tests.e2e.live.test_release_train import child_run, overlap

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[3]


@pytest.mark.long  # a scheduled train of three releases: in `make test-long`
def test_scheduled_release_all_releases_the_queued_manifest_and_stops_at_the_first_failure(live_airflow):
    """Queue a manifest for the next release_all window (every minute here); the scheduled run takes it and releases
    auth-service and billing-service at the same time (neither depends on the other in the live catalog);
    billing-service fails and rolls itself back, auth-service finishes its release normally, and
    notification-service, which depends on both, is not attempted. Scheduled runs with nothing queued do nothing."""
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    td_before = {s: ecs.describe_services(cluster="omnisphere", services=[s])["services"][0]["taskDefinition"]
                 for s in ("auth-service", "billing-service", "notification-service")}
    suffix = str(int(time.time()))
    manifest = {"auth-service": f"5.0.{suffix}", "billing-service": f"5.0.{suffix}-crashloop",
                "notification-service": f"5.0.{suffix}"}
    for service, tag in manifest.items():
        push_image(service, tag)
    queued = live_airflow.post("/dags/queue_release/dagRuns", json={
        "logical_date": None, "conf": {"manifest": manifest, "window": "next", "reason": "live e2e"}})
    assert queued.status_code == 200, queued.text
    assert wait_for_run(live_airflow, "queue_release", queued.json()["dag_run_id"], timeout=120)["state"] == "success"
    window = client_xcom(live_airflow, "queue_release", queued.json()["dag_run_id"], "queue")["window_start"]
    deadline = time.monotonic() + 600
    taken = idle = None
    while time.monotonic() < deadline and not (taken and idle):
        runs = live_airflow.get("/dags/release_all/dagRuns", params={"run_type": ["scheduled"], "limit": 50,
                                                                       "order_by": "-run_after"}).json()["dag_runs"]
        for run in runs:
            if run["state"] not in ("success", "failed"):
                continue
            states = task_states(live_airflow, "release_all", run["dag_run_id"])
            if states.get("check_manifest") == "success":
                taken = (run, states)
            elif states.get("check_manifest") == "skipped" and run["state"] == "success":
                idle = run
        time.sleep(5)
    assert idle, "no scheduled release_all run was seen doing nothing for an empty window"
    assert taken, f"no scheduled release_all run took the manifest queued for {window}"
    run, states = taken
    assert run["data_interval_start"].startswith(window[:16])
    assert run["state"] == "failed"
    assert states["release_auth-service"] == "success"
    assert states["release_billing-service"] == "failed"
    # notification-service depends on billing-service: stopped by the edge, never asked for a slot.
    assert states["start_notification-service"] == "upstream_failed"
    assert states["release_notification-service"] == "upstream_failed"
    assert states["summary"] == "failed"
    auth_run, billing_run = (child_run(live_airflow, run["dag_run_id"], s) for s in ("auth-service", "billing-service"))
    assert billing_run["state"] == "failed"
    assert overlap(auth_run, billing_run), (auth_run, billing_run)  # released at the same time
    billing_states = task_states(live_airflow, "release_billing-service", billing_run["dag_run_id"])
    assert billing_states["ecs_deploy"] == "failed" and billing_states["verify_rollback"] == "success"
    summary = client_xcom(live_airflow, "release_all", run["dag_run_id"], "summary")
    assert {s: (o["outcome"], o["why"]) for s, o in summary.items()} == {
        "auth-service": ("released", "every stage passed"),
        "billing-service": ("rolled back", "its release failed and was rolled back"),
        "notification-service": ("not attempted", "depends on billing-service which failed"),
    }
    assert summary["billing-service"]["run_url"].endswith(
        f"/dags/release_billing-service/runs/{quote(billing_run['dag_run_id'], safe='')}")
    assert summary["notification-service"]["run_url"] == ""
    td_after = {s: ecs.describe_services(cluster="omnisphere", services=[s])["services"][0]["taskDefinition"]
                for s in td_before}
    assert td_after["auth-service"] != td_before["auth-service"]  # released, and stays released
    assert td_after["billing-service"] == td_before["billing-service"]  # rolled back
    assert td_after["notification-service"] == td_before["notification-service"]  # not attempted


def test_invalid_release_params_are_refused_by_the_api(live_airflow):
    response = live_airflow.post("/dags/release_auth-service/dagRuns", json={
        "logical_date": None, "conf": {"image_tag": "not a tag!"}})
    assert response.status_code == 400
    assert "image_tag" in response.text
    response = live_airflow.post("/dags/release_all/dagRuns", json={
        "logical_date": None, "conf": {"manifest": {"payments-service": "1.0"}}})
    run_id = response.json()["dag_run_id"]
    assert wait_for_run(live_airflow, "release_all", run_id)["state"] == "failed"
    assert task_states(live_airflow, "release_all", run_id)["check_manifest"] == "failed"


def omni_release(live_airflow, *args: str, password: str | None = None) -> subprocess.CompletedProcess:
    info = live_airflow.info
    env = {**os.environ, "OMNI_AIRFLOW_URL": info["url"], "OMNI_AIRFLOW_USERNAME": info["username"],
           "OMNI_AIRFLOW_PASSWORD": password or info["password"], "PYTHONPATH": str(REPO / "plugins")}
    return subprocess.run([sys.executable, "-m", "omnisphere_release.client", *args], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.long  # a deferred wait for a window under the live scheduler (~85 s): in `make test-long`
def test_cli_release_waits_for_its_window_deferred_then_succeeds(live_airflow):
    from datetime import datetime, timedelta, timezone

    opens = (datetime.now(timezone.utc) + timedelta(seconds=20)).isoformat(timespec="seconds")
    tag = f"6.0.{int(time.time())}"
    push_image("auth-service", tag)  # as CI does before it triggers
    result = omni_release(live_airflow, "trigger", "auth-service", "--image-tag", tag,
                          "--window", opens, "--force-reason", "CI release at a chosen time, outside the window",
                          "--reason", "CI release", "--wait", "--poll", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Triggered release_auth-service/" in result.stdout and "/dags/release_auth-service/runs/" in result.stdout
    assert "wait_for_window: deferred" in result.stdout  # waiting held no worker slot
    assert "monitoring_gate: success" in result.stdout
    assert "RELEASED: every stage passed" in result.stdout


@pytest.mark.long  # a whole failed release and its rollback under the live scheduler (~80 s): in `make test-long`
def test_cli_failed_release_exits_1_with_the_report_and_the_failed_task_log(live_airflow):
    tag = f"6.1.{int(time.time())}-unhealthy"
    push_image("notification-service", tag)
    result = omni_release(live_airflow, "trigger", "notification-service", "--image-tag", tag,
                          "--window", "now", "--force-reason", "CI hotfix",
                          "--wait", "--poll", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED and ROLLED BACK" in result.stdout
    assert "---- log of failed task smoke_test" in result.stdout
    assert "FAILED: status 503, expected 200" in result.stdout  # the cause, from the task log via the API
    assert "GET /health -> 503" in result.stdout
    run = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("Triggered "))
    logs = omni_release(live_airflow, "logs", run)
    assert logs.returncode == 0 and "rollback_ecs" in logs.stdout


def test_cli_bad_param_exits_2_with_the_api_message(live_airflow):
    result = omni_release(live_airflow, "trigger", "auth-service", "--image-tag", "not a tag!", "--window", "now",
                          "--force-reason", "x")
    assert result.returncode == 2
    assert "image_tag" in result.stderr


def test_cli_wrong_password_exits_4(live_airflow):
    result = omni_release(live_airflow, "status", "release_auth-service/whatever", password="wrong-password")  # noqa: S106 - a wrong one
    assert result.returncode == 4
    assert "refused the credentials" in result.stderr
