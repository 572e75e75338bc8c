"""Run a local Airflow (``airflow standalone``: API server + UI, scheduler, DAG processor, triggerer) on the devstack.

Used by ``make up`` / ``make down`` and by tests that need a live API server. Airflow runs in its own process group
so that stopping it stops every child it started; its API listens on 127.0.0.1 only.

``auth="fab"`` (``make up AUTH=fab``, or OMNI_AIRFLOW_AUTH=fab) runs production's FAB auth manager instead of the
simple one: the roles come from the catalog (``python -m omnisphere_release.access sync``) and each role gets one
local user, whose generated password is kept in ``<home>/fab-users.json`` (mode 0600), never in a process's
arguments (``python -m devstack.airflow_server users HOME`` prints them). ``airflow standalone`` always runs the
simple auth manager, so with FAB the same four parts run as children of ``python -m devstack.airflow_server parts``.
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
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
AUTH_MANAGERS = {"simple": SIMPLE_AUTH_MANAGER, "fab": FAB_AUTH_MANAGER}
FAB_USERS_FILE = "fab-users.json"
PARTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def auth_choice(auth: str | None = None) -> str:
    """Return ``auth``, else OMNI_AIRFLOW_AUTH (``make up AUTH=...``), else ``simple``; refuse anything else."""
    chosen = auth or os.environ.get("OMNI_AIRFLOW_AUTH") or "simple"
    if chosen not in AUTH_MANAGERS:
        raise ValueError(f"AUTH={chosen!r}: choose {' or '.join(AUTH_MANAGERS)} (simple is the default)")
    return chosen


def airflow_env(devstack_env: dict[str, str], home: Path, port: int,
                extra: dict[str, str] | None = None, auth: str | None = None) -> dict[str, str]:
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
        "AIRFLOW__CORE__AUTH_MANAGER": AUTH_MANAGERS[auth_choice(auth)],
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
          extra_env: dict[str, str] | None = None, auth: str | None = None) -> dict[str, str]:
    """Start Airflow in the background; return when its API answers. Return url, username and password (the
    admin's), and with ``auth="fab"`` ``users``: the file that holds each role's user and password."""
    auth = auth_choice(auth)
    home.mkdir(parents=True, exist_ok=True)
    env = airflow_env(devstack_env, home, port, extra_env, auth)
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([*airflow, "pools", "set", *MIGRATIONS_POOL], env=env, check=True, capture_output=True,
                   timeout=120)
    if auth == "fab":
        prepare_fab(env, home)
        password = fab_users(home)[ADMIN_USER]["password"]
    else:
        password = admin_password(home)
    log = open(home / "standalone.log", "ab")  # noqa: SIM115 - handed to the child
    loopback_shim(home)
    # standalone always runs the simple auth manager: with FAB, the same parts run under a launcher of this module.
    command = ([str(home / "bin" / "airflow"), "standalone"] if auth == "simple"
               else [sys.executable, "-m", "devstack.airflow_server", "parts", str(home), *PARTS])
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               cwd=REPO, start_new_session=True)
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
    info = {"url": url, "username": ADMIN_USER, "password": password}
    if auth == "fab":
        info["users"] = str(home / FAB_USERS_FILE)
    return info


# ---- the FAB auth manager: roles from the catalog, one local user per role ------------------------------------------
def prepare_fab(env: dict[str, str], home: Path) -> None:
    """Sync the roles from the catalog, then give each role (and Admin) a local user, in one subprocess with
    ``env`` (each Airflow process pays seconds of imports and FAB's start)."""
    command = [sys.executable, "-m", "devstack.airflow_server", "fab-users", str(home)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode:
        raise RuntimeError(f"`{' '.join(command[1:])}` failed:\n" + (result.stdout + result.stderr)[-3000:])


def fab_users(home: Path) -> dict[str, dict[str, str]]:
    """Return the local FAB users written by ``create_fab_users``: username -> role and password."""
    path = home / FAB_USERS_FILE
    return dict(json.loads(path.read_text())) if path.exists() else {}


def create_fab_users(home: Path) -> dict[str, dict[str, str]]:
    """Sync the roles from the catalog (``omnisphere_release.access sync``), then give Admin and each role one user
    named after it (``admin`` for Admin), with a generated password kept in ``<home>/fab-users.json`` (0600); reuse
    the passwords found there. Run with the Airflow env."""
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    from omnisphere_release.access import roles_from_catalog, sync
    from omnisphere_release.catalog import load_catalog

    catalog = load_catalog()
    sync(catalog)
    wanted = {ADMIN_USER: "Admin", **{role: role for role in sorted(roles_from_catalog(catalog))}}
    users = fab_users(home)
    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        for username, role_name in wanted.items():
            role = sm.find_role(role_name)
            if role is None:
                raise RuntimeError(f"role {role_name} does not exist: run `python -m omnisphere_release.access sync`")
            password = users.get(username, {}).get("password") or secrets.token_urlsafe(12)
            user = sm.find_user(username=username)
            if user is None:
                sm.add_user(username, username, "(local)", f"{username}@omnisphere.invalid", role, password)
            else:
                user.roles = [role]
                sm.update_user(user)
                sm.reset_password(user.id, password)
            users[username] = {"role": role_name, "password": password}
    _write_private(home / FAB_USERS_FILE, users)
    return users


def _write_private(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(json.dumps(document, indent=2))


def run_parts(home: Path, parts: list[str]) -> int:
    """Run Airflow's ``parts`` as children in this process group (``stop`` ends them all); when one exits, stop the
    others and exit with its code, as standalone does."""
    import signal

    children = {part: subprocess.Popen([str(home / "bin" / "airflow"), part], stdin=subprocess.DEVNULL)
                for part in parts}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        while True:
            for part, child in children.items():
                if (code := child.poll()) is not None:
                    print(f"devstack.airflow_server: {part} exited with {code}; stopping the other parts", flush=True)
                    return code or 1
            time.sleep(0.5)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        for child in children.values():
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()


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


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m devstack.airflow_server")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("fab-users", "sync the roles, then create or update the local FAB users (one per role)"),
                       ("users", "print the local FAB users and their passwords")):
        commands.add_parser(name, help=text).add_argument("home", type=Path)
    parts = commands.add_parser("parts", help="run Airflow parts as children (FAB: standalone cannot)")
    parts.add_argument("home", type=Path)
    parts.add_argument("parts", nargs="+", choices=PARTS)
    args = parser.parse_args(argv)
    if args.command == "parts":
        return run_parts(args.home, args.parts)
    users = create_fab_users(args.home) if args.command == "fab-users" else fab_users(args.home)
    if args.command == "users":
        if not users:
            print(f"no FAB users in {args.home / FAB_USERS_FILE}: start Airflow with `make up AUTH=fab`")
            return 1
        print("Users (FAB auth manager; passwords kept in " + str(args.home / FAB_USERS_FILE) + "):")
        for username, user in users.items():
            print(f"  {username:<24} role {user['role']:<24} password {user['password']}")
    else:
        print(f"{len(users)} local FAB users ready ({', '.join(users)}); passwords in {args.home / FAB_USERS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
