"""The production topology on this machine (``make up EXECUTOR=celery``, devstack/topology.py): PostgreSQL metadata,
Redis, the API server, scheduler, DAG processor, triggerer and two Celery workers, each supervised. A killed
triggerer and a killed worker are back within seconds, and a release then runs through the REST API on both workers
and the restarted triggerer. Stopping leaves no process and no port."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from tests.e2e.helpers import push_image
from tests.e2e.live.helpers import task_states, wait_for_run

# The production topology under killed parts: ~2.5 min, in `make test-long` (the chaos tests run on it too).
pytestmark = [pytest.mark.e2e, pytest.mark.long,
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed (apt-get install -y redis-server)")]
REPO = Path(__file__).resolve().parents[2]
RESTART_SECONDS = 30  # "back within seconds": a worker needs a few to load Airflow and answer a Celery ping


@pytest.fixture(scope="module")
def topology(devstack, secret_watch):
    from devstack import topology as local_topology
    from devstack.net import free_port

    home = Path(tempfile.mkdtemp(prefix="omni-celery-"))
    catalog = yaml.safe_load((REPO / "include" / "services.yaml").read_text())
    for service in catalog["services"]:  # a short bake and smoke test, as the live tests use
        service["deploy"]["bake_minutes"] = 0.1
        service["smoke_deadline_seconds"] = 4
    (home / "services.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    database = f"airflow_test_{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    topo = local_topology.start(devstack, home, free_port(), database=database,
                                extra_env={"OMNISPHERE_CATALOG": str(home / "services.yaml")})
    print(f"Celery topology ready in {time.monotonic() - started:.1f}s")
    saved = json.loads((home / local_topology.DB_FILE).read_text())
    secret_watch.watch_env({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql://{database}:{saved['password']}@x/"})
    processes = _processes(topo)
    try:
        yield topo
    finally:
        processes += _processes(topo)  # the restarted parts too
        leftovers = topo.stop(drop_database=True)
        secret_watch.scan_logs("Celery topology log", home / "logs", *home.glob("*.log"))
        still_running = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(home, ignore_errors=True)
        assert leftovers == [], f"still listening after stop: {leftovers}"
        assert still_running == [], f"still running after stop: {still_running}"


def _processes(topo) -> list[psutil.Process]:
    """The supervisor and every process of every part (a worker's pool, the log servers...)."""
    pids = [topo.state()["supervisor"], *(topo.pid(part) for part in topo.state()["parts"])]
    found = []
    for pid in filter(None, pids):
        try:
            process = psutil.Process(pid)
            found += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return found


def test_every_part_runs_and_listens_on_loopback_only(topology):
    from devstack.topology import PARTS

    assert all(topology.pid(part) for part in PARTS), topology.state()
    assert topology.workers_answering() == {"worker1", "worker2"}
    listening = {(conn.laddr.ip, conn.laddr.port) for process in _processes(topology)
                 for conn in _listening(process)}
    assert listening, "the topology listens on no port?"
    assert {ip for ip, _port in listening} == {"127.0.0.1"}, listening
    ports = topology.state()["ports"]["listening"]
    assert {port for _ip, port in listening} >= set(ports.values())
    assert ports["worker1 logs"] != ports["worker2 logs"]  # each worker serves its logs on a port of its own


def _listening(process: psutil.Process) -> list:
    try:
        return [conn for conn in process.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_killed_parts_come_back_and_a_release_then_runs_on_both_workers(topology):
    for part in ("triggerer", "worker2"):
        killed_at = time.monotonic()
        old_pid = topology.kill(part)
        new_pid = topology.wait_restarted(part, old_pid, timeout=RESTART_SECONDS)
        print(f"{part}: SIGKILL pid {old_pid}, back as pid {new_pid} in {time.monotonic() - killed_at:.1f}s")
        assert topology.restarts(part) == 1
    assert topology.workers_answering() == {"worker1", "worker2"}

    client = topology.client()
    tag = f"7.0.{int(time.time())}"
    push_image("auth-service", tag)
    response = client.post("/dags/release_auth-service/dagRuns", json={"logical_date": None, "conf": {
        "image_tag": tag, "window": "now", "force_reason": "Celery topology test", "reason": "Celery topology test"}})
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]
    running_on = watch_running_tasks(topology, client, "release_auth-service", run_id, timeout=150)
    print(f"running tasks seen, by the part their process ran under: {running_on}")
    assert running_on and set(running_on.values()) <= {"worker1", "worker2"}, running_on
    run = wait_for_run(client, "release_auth-service", run_id, timeout=10)
    states = task_states(client, "release_auth-service", run_id)
    assert run["state"] == "success", states
    assert states["monitoring_gate"] == "success" and states["finalize"] == "success"
    assert states["rollback_ecs"] == "skipped"
    ran_on = {worker: tasks_run_by(topology.log(worker), run_id) for worker in ("worker1", "worker2")}
    print(f"tasks per worker: {ran_on}")
    assert all(ran_on.values()), f"not every worker ran a task of {run_id}: {ran_on}"
    assert set().union(*ran_on.values()) >= {"preflight", "ecs_deploy", "monitoring_gate", "finalize"}


def watch_running_tasks(topology, client, dag_id: str, run_id: str, timeout: float) -> dict[str, str | None]:
    """Until the run ends, find the part each running task's process (its ``pid``) runs under."""
    seen: dict[str, str | None] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get(f"/dags/{dag_id}/dagRuns/{run_id}").json()["state"] in ("success", "failed"):
            return seen
        for ti in client.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]:
            if ti["state"] == "running" and ti.get("pid") and ti["task_id"] not in seen:
                part = topology.part_of(ti["pid"])
                if part or psutil.pid_exists(ti["pid"]):  # a process that ended meanwhile tells nothing
                    seen[ti["task_id"]] = part
        time.sleep(0.3)
    raise AssertionError(f"{dag_id} {run_id} did not end within {timeout:.0f}s")


def tasks_run_by(worker_log: Path, run_id: str) -> set[str]:
    """The task ids of ``run_id`` a worker received, from the line the Celery executor logs for each workload."""
    return {match.group(1) for line in worker_log.read_text(errors="replace").splitlines()
            if "Executing workload in Celery" in line and run_id in line
            for match in [re.search(r"task_id='([^']+)'", line)] if match}
