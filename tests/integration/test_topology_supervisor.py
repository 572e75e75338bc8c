"""The supervisor of the local Celery topology (devstack/topology.py), on plain processes instead of Airflow's parts:
a killed part is restarted within seconds with the rest of its process group gone, a part that keeps dying is
restarted with backoff rather than in a loop, and stopping leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from devstack import topology

REPO = Path(__file__).resolve().parents[2]
STEADY = ("import subprocess, time\n"
          "subprocess.Popen(['sleep', '300'])\n"
          "subprocess.Popen(['sleep', '300'], process_group=0)\n"
          "time.sleep(300)\n")


def processes_of(home: Path) -> list[psutil.Process]:
    """Every process that runs with this topology's AIRFLOW_HOME (the supervisor, the parts and their children),
    the mark by which topology.stop tells its processes from others that reused a pid."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("AIRFLOW_HOME") == str(home) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture()
def supervised(tmp_path):
    home = tmp_path.resolve()
    (home / topology.SPEC_FILE).write_text(json.dumps({"ports": {"listening": {}}, "parts": {
        # a part with children, as a Celery worker has its pool and its task processes (which Airflow puts in a
        # process group of their own)
        "steady": {"argv": [sys.executable, "-c", STEADY], "env": {}},
        "flaky": {"argv": ["sh", "-c", "echo starting; exit 3"], "env": {}},
    }}))
    env = {**os.environ, "AIRFLOW_HOME": str(home), "PYTHONPATH": str(REPO)}
    with open(home / "topology.log", "ab") as log:
        supervisor = subprocess.Popen([sys.executable, "-m", "devstack.topology", "supervise", str(home)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (home / "topology.pid").write_text(str(supervisor.pid))
    topo = topology.Topology(home, "http://127.0.0.1:1", "admin", "unused")
    deadline = time.monotonic() + 20
    while topo.state().get("status") != "running" or len(steady_children(topo)) < 2:
        assert time.monotonic() < deadline and supervisor.poll() is None, (home / "topology.log").read_text()
        time.sleep(0.1)
    try:
        yield topo
    finally:
        topology.stop(home)
        supervisor.wait(timeout=10)


def steady_children(topo) -> list[psutil.Process]:
    pid = topo.pid("steady") if topo.state().get("parts") else None
    try:
        return psutil.Process(pid).children() if pid else []
    except psutil.NoSuchProcess:
        return []


def test_a_killed_part_is_back_within_seconds_and_its_children_are_gone(supervised):
    old_pid = supervised.pid("steady")
    children = steady_children(supervised)
    assert [child.name() for child in children] == ["sleep", "sleep"]
    assert len({os.getpgid(child.pid) for child in children}) == 2  # one left the part's process group
    killed = supervised.kill("steady")
    assert killed == old_pid
    new_pid = supervised.wait_restarted("steady", old_pid, timeout=5)
    assert new_pid != old_pid
    assert supervised.restarts("steady") == 1
    psutil.wait_procs(children, timeout=5)
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children), (
        "the killed part's children outlived it: a container's processes die with its main process")
    assert f"steady (pid {old_pid}) was killed by SIGKILL" in (supervised.home / "topology.log").read_text()


def test_a_part_that_keeps_dying_is_restarted_with_backoff(supervised):
    time.sleep(4)
    restarts = supervised.restarts("flaky")
    # 1 s, 2 s, 4 s...: two or three restarts in four seconds, not hundreds
    assert 2 <= restarts <= 3, restarts
    log = (supervised.home / "topology.log").read_text()
    assert "exited with 3 after 0s; restarting it in 1.0s (restart #1" in log
    assert "exited with 3 after 0s; restarting it in 2.0s (restart #2" in log
    assert (supervised.log("flaky")).read_text().count("starting") == restarts + 1


def test_part_of_names_the_part_a_process_runs_under(supervised):
    child = steady_children(supervised)[0]  # as a task's process runs under a worker
    assert supervised.part_of(child.pid) == "steady"
    assert supervised.part_of(supervised.pid("steady")) == "steady"
    assert supervised.part_of(os.getpid()) is None


def test_unknown_part_names_the_parts(supervised):
    with pytest.raises(ValueError, match="unknown part 'triggerr'; the parts are steady, flaky"):
        supervised.pid("triggerr")


def test_stop_leaves_no_process(supervised):
    home = supervised.home
    assert len(processes_of(home)) >= 4  # supervisor, steady and its two sleeps, maybe flaky
    started = time.monotonic()
    assert topology.stop(home) == []
    assert time.monotonic() - started < topology.STOP_GRACE_SECONDS + 5
    assert processes_of(home) == []
    assert supervised.state()["status"] == "stopped"
    assert supervised.pid("steady") is None


def test_stop_after_the_supervisor_was_killed_stops_its_parts(supervised):
    home = supervised.home
    os.kill(supervised.state()["supervisor"], signal.SIGKILL)
    time.sleep(0.5)
    assert sum(p.name() == "sleep" for p in processes_of(home)) == 2  # orphaned, still running
    assert topology.stop(home) == []
    assert processes_of(home) == []


def test_a_missing_redis_is_a_clear_message_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(topology.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError) as error:
        topology.start({"OMNI_PG_ADMIN_DSN": "postgresql://unused"}, tmp_path, 1)
    assert "redis-server is not installed" in str(error.value)
    assert "apt-get install -y redis-server" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # refused before anything was made
