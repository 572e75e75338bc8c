"""release_all's trains under a live Airflow: max_parallel bounds how many services release at once, and a service
waits for those it depends on. (The live catalog makes auth-service and billing-service independent and
notification-service depend on both; the failure case is the scheduled run of test_airflow_api.py.)"""

from __future__ import annotations

import time
from datetime import datetime
from urllib.parse import quote

import httpx
import pytest

from tests.e2e.helpers import push_image
from tests.e2e.live.helpers import client_xcom, task_states, wait_for_run

# Several whole releases each: in `make test-long` (CI runs it after `make test`), not in `make test`.
pytestmark = [pytest.mark.e2e, pytest.mark.long]


def child_run(client: httpx.Client, release_all_run_id: str, service: str) -> dict:
    """Return the release run of ``service`` started by a release_all run, once it has ended."""
    return wait_for_run(client, f"release_{service}", f"{release_all_run_id}__{service}", timeout=120)


def overlap(first: dict, second: dict) -> bool:
    """Tell whether two runs were under way at the same time."""
    start = max(datetime.fromisoformat(first["start_date"]), datetime.fromisoformat(second["start_date"]))
    end = min(datetime.fromisoformat(first["end_date"]), datetime.fromisoformat(second["end_date"]))
    return start < end


def train(client: httpx.Client, conf: dict) -> tuple[str, dict[str, str]]:
    """Trigger release_all by hand and wait for it; return its run id and task states. A failed run's message
    carries its failed tasks' logs."""
    response = client.post("/dags/release_all/dagRuns", json={"logical_date": None, "conf": conf})
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]
    run = wait_for_run(client, "release_all", run_id, timeout=900)
    states = task_states(client, "release_all", run_id)
    failed = [task for task, state in states.items() if state == "failed"]
    assert run["state"] == "success", f"{states}\n" + "\n".join(task_log(client, run_id, task) for task in failed)
    return run_id, states


def task_log(client: httpx.Client, run_id: str, task_id: str) -> str:
    body = client.get(f"/dags/release_all/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/logs/1",
                      params={"full_content": True}, headers={"Accept": "application/json"}).json()
    lines = [f"---- {task_id}"]
    for item in body.get("content", []):
        lines.append(str(item.get("event", "")) if isinstance(item, dict) else str(item))
        lines += [f"    {e.get('exc_type')}: {e.get('exc_value')}" for e in (item.get("error_detail") or [])
                  if isinstance(item, dict) and isinstance(e, dict)]
    return "\n".join(lines)


def test_max_parallel_1_releases_independent_services_one_after_another_in_release_order(live_airflow):
    tag = f"7.0.{int(time.time())}"
    manifest = {"auth-service": tag, "billing-service": tag}
    for service in manifest:
        push_image(service, tag)
    run_id, states = train(live_airflow, {"manifest": manifest, "reason": "live e2e: one at a time",
                                          "force_reason": "live e2e", "max_parallel": 1})
    assert states["start_notification-service"] == states["release_notification-service"] == "skipped"
    auth, billing = child_run(live_airflow, run_id, "auth-service"), child_run(live_airflow, run_id, "billing-service")
    assert auth["state"] == billing["state"] == "success"
    # Independent, yet one at a time, in release order: billing started only after auth's release ended.
    assert datetime.fromisoformat(auth["end_date"]) <= datetime.fromisoformat(billing["start_date"]), (auth, billing)
    summary = client_xcom(live_airflow, "release_all", run_id, "summary")
    assert {s: o["outcome"] for s, o in summary.items()} == {"auth-service": "released", "billing-service": "released"}
    assert summary["auth-service"]["run_url"].endswith(
        f"/dags/release_auth-service/runs/{quote(auth['dag_run_id'], safe='')}")


def test_a_service_waits_for_every_service_it_depends_on_released_together(live_airflow):
    tag = f"7.1.{int(time.time())}"
    manifest = {"auth-service": tag, "billing-service": tag, "notification-service": tag}
    for service in manifest:
        push_image(service, tag)
    run_id, _ = train(live_airflow, {"manifest": manifest, "reason": "live e2e: a wave of two, then one",
                                     "force_reason": "live e2e"})
    auth, billing, notification = (child_run(live_airflow, run_id, s) for s in manifest)
    assert overlap(auth, billing), (auth, billing)  # the first wave: two releases at once
    started = datetime.fromisoformat(notification["start_date"])
    assert started >= max(datetime.fromisoformat(auth["end_date"]), datetime.fromisoformat(billing["end_date"]))


def test_a_max_parallel_that_is_not_a_count_is_refused_by_the_api(live_airflow):
    for bad in (0, 51, "two"):
        response = live_airflow.post("/dags/release_all/dagRuns", json={
            "logical_date": None, "conf": {"manifest": {"auth-service": "1.0.0"}, "max_parallel": bad}})
        assert response.status_code == 400, response.text
        assert "max_parallel" in response.text
