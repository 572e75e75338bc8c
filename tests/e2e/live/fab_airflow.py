"""A live Airflow API server with production's FAB auth manager, for the access tests: its own AIRFLOW_HOME, SQLite
metadata and free port on 127.0.0.1, the roles synced from the catalog and one user per role.

Only the API server runs: a permission check needs the DAGs in the metadata database (``airflow dags reserialize``
puts them there once) and the server, not a scheduler; a run triggered here stays queued. About 40 s to start.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]
GUARD_PLUGIN = '''"""The access tests' shim: registers omnisphere_release.access.ForceWindowGuard, which the project's plugin
(plugins/omnisphere_plugin.py) does not register yet."""
from airflow.plugins_manager import AirflowPlugin

from omnisphere_release.access import ForceWindowGuard


class ForceWindowGuardPlugin(AirflowPlugin):
    name = "omnisphere_force_window_guard"
    fastapi_root_middlewares = [{"middleware": ForceWindowGuard, "args": [], "kwargs": {}, "name": "force window"}]
'''


@dataclass
class FabAirflow:
    url: str
    home: Path
    users: dict[str, dict[str, str]] = field(repr=False)  # username -> role, password
    env: dict[str, str] = field(repr=False)  # the Airflow environment of this API server (holds its JWT secret)
    guard_from_shim: bool = False  # True while plugins/omnisphere_plugin.py does not register the guard itself

    def token(self, username: str) -> str:
        response = httpx.post(f"{self.url}/auth/token", json={"username": username,
                                                              "password": self.users[username]["password"]})
        assert response.status_code == 201, f"{username}: {response.status_code} {response.text}"
        return str(response.json()["access_token"])

    def client(self, username: str) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url}/api/v2", timeout=30,
                            headers={"Authorization": f"Bearer {self.token(username)}"})


def _plugins_folder(home: Path) -> tuple[Path, bool]:
    """The repository's plugins folder when its plugin registers the force-window guard; else a folder that holds
    the project's plugin and the guard's shim."""
    text = (REPO / "plugins" / "omnisphere_plugin.py").read_text()
    if "ForceWindowGuard" in text:
        return REPO / "plugins", False
    folder = home / "plugins"
    folder.mkdir()
    (folder / "omnisphere_plugin.py").symlink_to(REPO / "plugins" / "omnisphere_plugin.py")
    (folder / "omnisphere_force_window_guard.py").write_text(GUARD_PLUGIN)
    return folder, True


def _run(command: list[str], env: dict[str, str], what: str) -> None:
    started = time.monotonic()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode:
        raise RuntimeError(f"{what} failed:\n" + (result.stdout + result.stderr)[-3000:])
    print(f"fab_airflow: {what} in {time.monotonic() - started:.1f}s", flush=True)


@pytest.fixture(scope="module")
def fab_airflow(secret_watch) -> Iterator[FabAirflow]:
    from devstack import airflow_server
    from devstack.net import free_port
    from devstack.stack import stop_process_group

    home = Path(tempfile.mkdtemp(prefix="omni-fab-airflow-"))
    port = free_port()
    plugins, guard_from_shim = _plugins_folder(home)
    jwt_secret = secrets.token_hex(32)
    secret_watch.secrets.setdefault(jwt_secret, "the FAB Airflow's JWT secret")
    env = airflow_server.airflow_env({}, home, port, auth="fab", extra={
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
    })
    airflow = [sys.executable, "-m", "airflow"]
    process = None
    try:
        _run([*airflow, "db", "migrate"], env, "airflow db migrate")
        _run([*airflow, "dags", "reserialize"], env, "airflow dags reserialize")
        started = time.monotonic()
        airflow_server.prepare_fab(env, home)
        print(f"fab_airflow: roles synced and users created in {time.monotonic() - started:.1f}s", flush=True)
        users = airflow_server.fab_users(home)
        for username, user in users.items():  # the session fails if a log ever shows one of them
            secret_watch.secrets.setdefault(user["password"], f"the local FAB password of {username}")
        log = open(home / "api-server.log", "ab")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen([*airflow, "api-server"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        while True:
            try:
                if httpx.get(f"{url}/api/v2/monitor/health", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() - started > 120:
                raise RuntimeError("the API server did not start:\n"
                                   + (home / "api-server.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        print(f"fab_airflow: API server up on {url} in {time.monotonic() - started:.1f}s", flush=True)
        yield FabAirflow(url, home, users, env, guard_from_shim)
    finally:
        if process is not None:
            stop_process_group(process.pid, timeout=20)
        secret_watch.scan_logs("FAB Airflow log", home / "logs", home / "api-server.log")
        shutil.rmtree(home, ignore_errors=True)
