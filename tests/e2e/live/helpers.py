"""Helpers for tests that drive a live Airflow through its REST API."""

from __future__ import annotations

import json
import time

import httpx


def wait_for_run(client: httpx.Client, dag_id: str, run_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/dags/{dag_id}/dagRuns/{run_id}").json()
        if run["state"] in ("success", "failed"):
            return run
        time.sleep(3)
    raise AssertionError(f"{dag_id} {run_id} still {run['state']} after {timeout}s")


def task_states(client: httpx.Client, dag_id: str, run_id: str) -> dict[str, str]:
    tis = client.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    return {ti["task_id"]: ti["state"] for ti in tis}


def client_xcom(client: httpx.Client, dag_id: str, run_id: str, task_id: str) -> dict:
    entry = client.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
                       params={"deserialize": True}).json()
    value = entry["value"]
    return value if isinstance(value, dict) else json.loads(value)
