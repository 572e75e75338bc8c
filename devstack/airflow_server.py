"""Run a local Airflow (``airflow standalone``: API server + UI, scheduler, DAG processor, triggerer) on the devstack.

Used by ``make up`` / ``make down`` and by tests that need a live API server. Airflow runs in its own process group
so that stopping it stops every child it started; its API listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIGRATIONS_POOL = ("omnisphere_migrations", "2", "How many services migrate their schema at once")
ADMIN_USER = "admin"


def airflow_env(devstack_env: dict[str, str], home: Path, port: int,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **devstack_env}
    env.update({
        # `airflow standalone` starts its parts by calling `airflow` from PATH: first the shim that binds their log
        # servers to 127.0.0.1 (loopback_shim), then the project's venv.
        "PATH": f"{home / 'bin'}:{venv_bin}:{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        # Tasks reach the API through this URL; on a port other than 8080 they fail without it.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        # Links in logs and reports (release_all's summary) point at this Airflow, not at localhost:8080.
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # Locally a DAG is usable as soon as it is parsed; production keeps new DAGs paused.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "plugins"), str(REPO), env.get("PYTHONPATH")])),
    })
    env.update(extra or {})
    return env


def admin_password(home: Path) -> str:
    """Return the admin password, creating it on first use (the simple auth manager reads this file)."""
    path = home / "simple_auth_manager_passwords.json.generated"
    if path.exists():
        return json.loads(path.read_text())[ADMIN_USER]
    home.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    path.write_text(json.dumps({ADMIN_USER: password}))
    path.chmod(0o600)
    return password


def loopback_shim(home: Path) -> None:
    """Write ``<home>/bin/airflow``, which runs the airflow CLI with its log server bound to 127.0.0.1.

    The scheduler's executor and the triggerer that standalone starts serve task logs on every interface, with no
    setting to change it (see devstack.topology.airflow_on_loopback); they are found through PATH.
    """
    shim = home / "bin" / "airflow"
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m devstack.topology airflow "$@"\n')
    shim.chmod(0o755)


def start(devstack_env: dict[str, str], home: Path, port: int = 8080, timeout: float = 240,
          extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Start Airflow in the background; return when its API answers. Return url, username and password."""
    home.mkdir(parents=True, exist_ok=True)
    env = airflow_env(devstack_env, home, port, extra_env)
    password = admin_password(home)
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([*airflow, "pools", "set", *MIGRATIONS_POOL], env=env, check=True, capture_output=True,
                   timeout=120)
    log = open(home / "standalone.log", "ab")  # noqa: SIM115 - handed to the child
    loopback_shim(home)
    process = subprocess.Popen([str(home / "bin" / "airflow"), "standalone"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    (home / "standalone.pid").write_text(str(process.pid))
    # What `stop` checks is closed: the API, and the log servers of the scheduler and the triggerer.
    (home / "standalone.json").write_text(json.dumps({"ports": {
        "api-server": port,
        "scheduler logs": int(env.get("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT", "8793")),
        "triggerer logs": int(env.get("AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT", "8794"))}}))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(home)
            tail = (home / "standalone.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"Airflow did not start (see {home / 'standalone.log'}):\n{tail}")
        time.sleep(1)
    return {"url": url, "username": ADMIN_USER, "password": password}


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=3) as response:  # noqa: S310 - http://127.0.0.1
            body = json.loads(response.read())
    except (OSError, ValueError):
        return False
    parts = ("metadatabase", "scheduler", "dag_processor", "triggerer")
    return all((body.get(part) or {}).get("status") == "healthy" for part in parts)


def is_running(home: Path) -> bool:
    """Tell whether an `airflow standalone` started from ``home`` still runs."""
    pid_file = home / "standalone.pid"
    try:
        os.killpg(int(pid_file.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def stop(home: Path, timeout: float = 30) -> list[str]:
    """Stop Airflow's whole process group (standalone starts its parts as children); return the ports still open."""
    from devstack.net import port_is_open
    from devstack.stack import stop_process_group

    pid_file = home / "standalone.pid"
    if not pid_file.exists():
        return []
    stop_process_group(int(pid_file.read_text()), timeout)
    pid_file.unlink(missing_ok=True)
    state = home / "standalone.json"
    ports = json.loads(state.read_text())["ports"] if state.exists() else {}
    deadline = time.monotonic() + 10
    while any(port_is_open(port) for port in ports.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [f"port {port} ({name})" for name, port in ports.items() if port_is_open(port)]
