"""The production topology on this machine: Airflow on the CeleryExecutor, each part its own supervised process.

``make up EXECUTOR=celery`` runs what docker-compose.yaml runs, as local processes on the devstack:

    redis          the Celery broker (Debian's ``redis-server``), on a loopback port, nothing persisted
    api-server     the UI and the REST and Execution APIs, on 127.0.0.1:<port>
    scheduler      with its health check on a loopback port
    dag-processor
    triggerer      serving its logs on a port of its own
    worker1        ``airflow celery worker --celery-hostname worker1@%h``, serving its logs on a port of its own
    worker2        the same as worker2@%h

Airflow's metadata lives in a database of the devstack's PostgreSQL (``airflow`` for ``make up``), owned by a role of
the same name whose generated password is kept in ``<home>/metadata-db.json`` (mode 0600), never in a process's
arguments. The settings every deployment shares come from airflow.env, the file docker-compose.yaml reads too; this
module adds what is this deployment's own (hosts, ports, secrets) and the LOCAL_OVERRIDES below.

A supervisor (``python -m devstack.topology supervise HOME``, its own process group) starts every part as a child in
a session of its own, and restarts a part whose main process died, as compose's ``restart: always`` does:
first after a second, then with a doubling backoff (at most 30 s) while the part keeps dying within a minute of its
start. As when a container's main process dies, the rest of the part (every process of its session, task processes
included) is killed before the restart.
Each part logs to ``<home>/<part>.log``, the supervisor to ``<home>/topology.log``; ``<home>/topology.json`` holds
each part's current pid, its restart count and the ports. SIGTERM stops every part (SIGTERM, 10 s, then SIGKILL, as
``docker stop``) and then the supervisor.

For tests (the chaos tests build on this)::

    from devstack import topology

    topo = topology.start(devstack_env, home, port, extra_env={...})  # returns when the API is healthy and
    try:                                                               # both workers answer a Celery ping
        topo.client()                         # an httpx.Client on /api/v2 with the admin's token
        old = topo.kill("triggerer")          # SIGKILL (or any signal) the part's main process; returns its pid
        new = topo.wait_restarted("triggerer", old, timeout=30)       # the new pid, once it runs (and answers, for
                                                                      # a worker)
        topo.part_of(ti_pid)                  # which part runs a process, e.g. a task instance's ``pid``
        topo.pid("scheduler"), topo.restarts("worker1"), topo.log("worker2")
    finally:
        topo.stop(drop_database=True)         # every process gone, every port closed; the scratch database dropped

``extra_env`` reaches every Airflow part (not Redis): a test shortens timeouts there, e.g.
``AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT``. ``start(..., database="airflow_<name>")`` gives a test a
metadata database of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.net import free_port, port_is_open

REPO = Path(__file__).resolve().parents[1]
SHARED_SETTINGS = REPO / "airflow.env"
PARTS = ("redis", "api-server", "scheduler", "dag-processor", "triggerer", "worker1", "worker2")
WORKERS = ("worker1", "worker2")
STATE_FILE = "topology.json"
SPEC_FILE = "topology-spec.json"
SECRETS_FILE = "topology-secrets.json"
DB_FILE = "metadata-db.json"
REDIS_MISSING = ("redis-server is not installed: the Celery topology uses it as its broker. Install it with\n"
                 "    sudo apt-get update && sudo apt-get install -y redis-server\n"
                 "(.ci/run does this in CI), or run plain `make up` (airflow standalone, no broker).")
# Where this machine's topology departs from airflow.env on purpose, and why.
LOCAL_OVERRIDES = {
    # Locally a DAG is usable as soon as it is parsed; production keeps new DAGs paused until someone unpauses them.
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    # Locally the simple auth manager (one admin who may do everything), as `airflow standalone`; with
    # `make up AUTH=fab` production's FAB auth manager stays, with the roles from the catalog and a user per role.
    "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
}
STOP_GRACE_SECONDS = 10.0  # as `docker stop`: SIGTERM, then SIGKILL what is left after this long
MAX_BACKOFF_SECONDS = 30.0
STABLE_SECONDS = 60.0  # a part that ran this long before it died is restarted at once again

log = logging.getLogger("devstack.topology")


def shared_settings() -> dict[str, str]:
    """Read airflow.env: the Airflow settings every deployment shares (KEY=VALUE lines, # comments)."""
    return dict(line.split("=", 1) for line in SHARED_SETTINGS.read_text().splitlines()
                if line.strip() and not line.startswith("#"))


# ---- preparing a topology: metadata database, secrets, the env and the parts -----------------------------------------
def metadata_database(admin_dsn: str, home: Path, database: str) -> str:
    """Create (or reuse) a role and a database named ``database`` on the devstack's server; return its DSN.

    The role's password is generated once and kept in ``<home>/metadata-db.json`` (0600); when that file is lost
    the role gets a new one. Identifiers are quoted by psycopg2.sql and the password is a bound parameter.
    """
    import psycopg2
    from psycopg2 import sql

    path = home / DB_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    password = saved.get("password") if saved.get("database") == database else None
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [database])
            role_exists = cur.fetchone() is not None
            if not role_exists or password is None:
                password = secrets.token_urlsafe(18)
                verb = "ALTER" if role_exists else "CREATE"
                cur.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(database)),
                            [password])
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database])
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database),
                                                                          sql.Identifier(database)))
    finally:
        conn.close()
    _write_private(path, {"database": database, "password": password})
    server = urllib.parse.urlsplit(admin_dsn)
    return f"postgresql+psycopg2://{database}:{password}@{server.hostname}:{server.port}/{database}"


def drop_metadata_database(admin_dsn: str, database: str) -> None:
    """Drop a topology's database and role (a test's scratch metadata), even with sessions still connected."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(database)))
    finally:
        conn.close()


def _write_private(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(json.dumps(document))


def _deployment_secrets(home: Path) -> dict[str, str]:
    """The Fernet key, the JWT secret and the API's session key every part shares, generated once per home (0600),
    as compose's variables; a home made before one of them existed gets it added."""
    from cryptography.fernet import Fernet

    path = home / SECRETS_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    generators = {"AIRFLOW__CORE__FERNET_KEY": lambda: Fernet.generate_key().decode(),
                  "AIRFLOW__API_AUTH__JWT_SECRET": lambda: secrets.token_hex(32),
                  "AIRFLOW__API__SECRET_KEY": lambda: secrets.token_hex(32)}
    if not path.exists() or generators.keys() - saved.keys():
        _write_private(path, {**{key: make() for key, make in generators.items()}, **saved})
    return dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class Ports:
    api: int
    redis: int
    scheduler_health: int
    trigger_logs: int
    worker_logs: dict[str, int]

    @classmethod
    def choose(cls, api: int) -> Ports:
        return cls(api=api, redis=free_port(), scheduler_health=free_port(), trigger_logs=free_port(),
                   worker_logs={worker: free_port() for worker in WORKERS})

    def listening(self) -> dict[str, int]:
        return {"api-server": self.api, "redis": self.redis, "scheduler health": self.scheduler_health,
                "triggerer logs": self.trigger_logs, **{f"{w} logs": p for w, p in self.worker_logs.items()}}


def topology_env(devstack_env: dict[str, str], home: Path, ports: Ports, metadata_dsn: str,
                 extra_env: dict[str, str] | None = None, auth: str | None = None) -> dict[str, str]:
    """Return the environment every Airflow part shares: airflow.env, then this deployment's own settings."""
    from devstack.airflow_server import AUTH_MANAGERS, airflow_env, auth_choice

    celery_backend = "db+" + metadata_dsn.replace("postgresql+psycopg2://", "postgresql://", 1)
    env = airflow_env(devstack_env, home, ports.api, auth=auth)
    env.update(shared_settings())
    env.update(LOCAL_OVERRIDES)
    if auth_choice(auth) == "fab":
        env["AIRFLOW__CORE__AUTH_MANAGER"] = AUTH_MANAGERS["fab"]
    env.update(_deployment_secrets(home))
    env.update({
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_dsn,
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{ports.redis}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": celery_backend,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{ports.api}/execution/",
        # Links in logs and reports (release_all's summary) point at this Airflow, not at localhost:8080.
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{ports.api}",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(ports.scheduler_health),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(ports.trigger_logs),
        # Where the API server looks for a running task's served log; each worker serves on its own port (below).
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(ports.worker_logs[WORKERS[0]]),
    })
    env.update(extra_env or {})
    return env


def part_commands(home: Path, ports: Ports) -> dict[str, dict[str, Any]]:
    """Each part's command line and its own environment on top of the shared one (no secret in either)."""
    airflow = [sys.executable, "-m", "airflow"]
    serving_logs = [sys.executable, "-m", "devstack.topology", "airflow"]  # see airflow_on_loopback
    redis_dir = home / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    parts: dict[str, dict[str, Any]] = {
        "redis": {"argv": [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
                           "--port", str(ports.redis), "--protected-mode", "yes", "--save", "",
                           "--appendonly", "no", "--dir", str(redis_dir), "--daemonize", "no"], "env": {}},
        "api-server": {"argv": [*airflow, "api-server"], "env": {}},
        "scheduler": {"argv": [*airflow, "scheduler"], "env": {}},
        "dag-processor": {"argv": [*airflow, "dag-processor"], "env": {}},
        "triggerer": {"argv": [*serving_logs, "triggerer"], "env": {}},
    }
    for worker in WORKERS:
        parts[worker] = {"argv": [*serving_logs, "celery", "worker", "--celery-hostname", f"{worker}@%h"],
                         "env": {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(ports.worker_logs[worker])}}
    return parts


# ---- the supervisor, in the foreground: ``python -m devstack.topology supervise HOME`` -------------------------------
class _Part:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restarts = 0
        self.quick_deaths = 0
        self.next_start = 0.0

    def start(self, base_env: dict[str, str]) -> None:
        if self.started:
            self.restarts += 1
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(self.argv, env={**base_env, **self.env}, cwd=REPO, stdout=log_file,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.started = time.monotonic()
        log.info("started %s (pid %d)%s", self.name, self.process.pid,
                 f", restart #{self.restarts}" if self.restarts else "")

    def reap(self) -> int | None:
        """Return the exit code when the part's main process has died (and kill what is left of its group)."""
        if self.process is None or (code := self.process.poll()) is None:
            return None
        # A container's processes die with its main process: here, every process of the part's session (the
        # task processes of a worker put themselves in process groups of their own, but stay in its session).
        _signal_session(self.process.pid, signal.SIGKILL)
        ran = time.monotonic() - self.started
        self.quick_deaths = 0 if ran >= STABLE_SECONDS else self.quick_deaths + 1
        delay = min(0.5 * 2 ** self.quick_deaths, MAX_BACKOFF_SECONDS) if self.quick_deaths else 0.5
        self.next_start = time.monotonic() + delay
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        log.warning("%s (pid %d) %s after %.0fs; restarting it in %.1fs (restart #%d, log %s)",
                    self.name, self.process.pid, how, ran, delay, self.restarts + 1, self.log_path)
        self.process = None
        return code


def supervise(home: Path) -> None:
    """Start every part, restart the ones that die, and stop them all on SIGTERM."""
    spec = json.loads((home / SPEC_FILE).read_text())
    parts = [_Part(name, part["argv"], part["env"], home / f"{name}.log") for name, part in spec["parts"].items()]
    base_env = dict(os.environ)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    def write_state(status: str) -> None:
        _write_state(home, {
            "status": status, "supervisor": os.getpid(), "ports": spec["ports"],
            "parts": {p.name: {"pid": p.process.pid if p.process else None, "restarts": p.restarts}
                      for p in parts}})

    try:
        for part in parts:
            part.start(base_env)
            if part.name == "redis":  # the broker first: the workers and the scheduler connect to it at once
                deadline = time.monotonic() + 20
                while not port_is_open(spec["ports"]["redis"]) and time.monotonic() < deadline:
                    time.sleep(0.1)
        write_state("running")
        log.info("supervising %d parts; state in %s", len(parts), home / STATE_FILE)
        while not stopping.wait(timeout=0.2):
            changed = False
            for part in parts:
                if part.reap() is not None:
                    changed = True
                elif part.process is None and time.monotonic() >= part.next_start:
                    part.start(base_env)
                    changed = True
            if changed:
                write_state("running")
    finally:
        log.info("stopping every part (SIGTERM, then SIGKILL after %.0fs)", STOP_GRACE_SECONDS)
        running = [p for p in reversed(parts) if p.process is not None]  # workers first, the broker last
        for part in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(part.process.pid, signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for part in running:
            pid = part.process.pid  # type: ignore[union-attr]
            with contextlib.suppress(subprocess.TimeoutExpired):
                part.process.wait(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
            while _session(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _session(pid):
                log.warning("%s (pid %d): %d processes still running %.0fs after SIGTERM: SIGKILL", part.name, pid,
                            len(_session(pid)), STOP_GRACE_SECONDS)
            _signal_session(pid, signal.SIGKILL)
            part.process = None
        write_state("stopped")
        log.info("every part stopped")


def _write_state(home: Path, state: dict[str, Any]) -> None:
    tmp = home / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(home / STATE_FILE)


def _session(sid: int, home: Path | None = None) -> list[int]:
    """The live processes of session ``sid`` (each part is a session of its own: it started with setsid), only
    those of the topology of ``home`` when given (a session id may have been reused since)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the command: state, ppid, process group, session
        if int(fields[3]) == sid and fields[0] != "Z" and (home is None or _runs_in(int(entry.name), home)):
            members.append(int(entry.name))
    return members


def _signal_session(sid: int, sig: int, home: Path | None = None) -> None:
    for pid in _session(sid, home):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _runs_in(pid: int, home: Path) -> bool:
    """Tell whether ``pid`` is a process of the topology of ``home`` (and not another one that reused the pid)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"AIRFLOW_HOME={home}".encode() in environ


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not reaped yet
    except OSError:
        return False


# ---- background control: start, inspect, kill, stop -----------------------------------------------------------------
class Topology:
    """A running topology, as seen through its home folder. See the module docstring."""

    def __init__(self, home: Path, url: str, username: str, password: str, database: str | None = None,
                 admin_dsn: str | None = None) -> None:
        self.home, self.url, self.username, self.password = home, url, username, password
        self.database, self.admin_dsn = database, admin_dsn

    # -- what runs
    def state(self) -> dict[str, Any]:
        path = self.home / STATE_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def pid(self, part: str) -> int | None:
        """The current pid of a part's main process, or None while it is down between a death and its restart."""
        pid = self._part(part).get("pid")
        return pid if _alive(pid) else None

    def restarts(self, part: str) -> int:
        return int(self._part(part).get("restarts", 0))

    def log(self, part: str) -> Path:
        self._part(part)
        return self.home / f"{part}.log"

    def _part(self, part: str) -> dict[str, Any]:
        parts = self.state().get("parts", {})
        if part not in parts:
            raise ValueError(f"unknown part {part!r}; the parts are {', '.join(parts or PARTS)}")
        return dict(parts[part])

    def part_of(self, pid: int) -> str | None:
        """Name the part whose process tree holds ``pid`` (a task instance's pid runs under a worker), or None."""
        mains = {p["pid"]: name for name, p in self.state().get("parts", {}).items() if p.get("pid")}
        while pid and pid > 1:
            if pid in mains:
                return mains[pid]
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    pid = int(stat.read().rsplit(")", 1)[1].split()[1])  # state, then ppid
            except OSError:
                return None
        return None

    # -- faults
    def kill(self, part: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to a part's main process; return its pid. Once that process has died, the supervisor kills
        the rest of the part (its session) and starts it again."""
        pid = self.pid(part)
        if pid is None:
            raise RuntimeError(f"{part} is not running now (restarting?); see {self.log(part)}")
        log.info("sending %s to %s (pid %d)", signal.Signals(sig).name, part, pid)
        os.kill(pid, sig)
        return pid

    def wait_restarted(self, part: str, old_pid: int, timeout: float = 60) -> int:
        """Wait until the supervisor has started ``part`` again (a new pid, alive; a worker also answers a Celery
        ping); return the new pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pid(part)
            if pid not in (None, old_pid) and (part not in WORKERS or part in self.workers_answering()):
                return pid
            time.sleep(0.2)
        raise AssertionError(f"{part} (pid {old_pid} before) was not back within {timeout:.0f}s; "
                             f"state: {self.state().get('parts', {}).get(part)}; see {self.log(part)} and "
                             f"{self.home / 'topology.log'}")

    # -- health
    def workers_answering(self, timeout: float = 1.0) -> set[str]:
        """The workers (worker1, worker2) that answer a Celery ping through the broker."""
        from celery import Celery  # type: ignore[import-untyped]

        ports = self.state().get("ports", {})
        app = Celery(broker=f"redis://127.0.0.1:{ports.get('redis')}/0")
        try:
            replies = app.control.ping(timeout=timeout)
        except Exception:  # noqa: BLE001 - the broker itself may be restarting: nobody answers
            return set()
        finally:
            app.close()
        return {name.split("@", 1)[0] for reply in replies for name in reply}

    def healthy(self) -> bool:
        from devstack.airflow_server import healthy

        return healthy(self.url)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not (self.healthy() and self.workers_answering() >= set(WORKERS)):
            supervisor = self.state().get("supervisor")
            if (supervisor and not _alive(supervisor)) or time.monotonic() > deadline:
                raise RuntimeError(f"the Celery topology did not start within {timeout:.0f}s "
                                   f"(see {self.home / 'topology.log'} and the parts' logs in {self.home}):\n"
                                   + _tail(self.home / "topology.log"))
            time.sleep(1)

    def client(self) -> Any:
        """An httpx.Client on the REST API (/api/v2), signed in as the admin."""
        import httpx

        token = httpx.post(f"{self.url}/auth/token", json={"username": self.username, "password": self.password},
                           timeout=30).json()["access_token"]
        return httpx.Client(base_url=f"{self.url}/api/v2", headers={"Authorization": f"Bearer {token}"},
                            timeout=30)

    def stop(self, drop_database: bool = False) -> list[str]:
        """Stop every part and the supervisor; return what is still left (empty when clean)."""
        leftovers = stop(self.home)
        if drop_database and self.database and self.admin_dsn:
            drop_metadata_database(self.admin_dsn, self.database)
        return leftovers


def _tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else "(no log)"


def require_redis() -> None:
    """Refuse, with the command that installs it, when Debian's redis-server is not installed."""
    if shutil.which("redis-server") is None:
        raise RuntimeError(REDIS_MISSING)


def is_running(home: Path) -> bool:
    state = json.loads((home / STATE_FILE).read_text()) if (home / STATE_FILE).exists() else {}
    return state.get("status") == "running" and _alive(state.get("supervisor"))


def start(devstack_env: dict[str, str], home: Path, port: int = 8080, extra_env: dict[str, str] | None = None,
          database: str = "airflow", timeout: float = 300, auth: str | None = None) -> Topology:
    """Start the topology in the background unless it runs already; return when it is ready. See the docstring.
    ``auth="fab"`` (or OMNI_AIRFLOW_AUTH=fab): production's FAB auth manager, see devstack.airflow_server."""
    from devstack.airflow_server import ADMIN_USER, MIGRATIONS_POOL, admin_password, auth_choice, fab_users

    require_redis()
    auth = auth_choice(auth)
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    admin_dsn = devstack_env["OMNI_PG_ADMIN_DSN"]
    password = admin_password(home) if auth == "simple" else fab_users(home).get(ADMIN_USER, {}).get("password", "")
    if is_running(home):
        state = json.loads((home / STATE_FILE).read_text())
        topology = Topology(home, f"http://127.0.0.1:{state['ports']['api-server']}", ADMIN_USER, password,
                            database, admin_dsn)
        topology.wait_ready(timeout)
        return topology
    stop(home)  # what a killed supervisor may have left
    ports = Ports.choose(port)
    env = topology_env(devstack_env, home, ports, metadata_database(admin_dsn, home, database), extra_env, auth)
    airflow = [sys.executable, "-m", "airflow"]
    started = time.monotonic()
    for command in (["db", "migrate"], ["pools", "set", *MIGRATIONS_POOL]):
        result = subprocess.run([*airflow, *command], env=env, capture_output=True, text=True, timeout=300,
                                check=False)
        if result.returncode:
            raise RuntimeError(f"`airflow {' '.join(command)}` failed on the metadata database {database}:\n"
                               + (result.stdout + result.stderr)[-3000:])
    log.info("metadata database %s migrated in %.1fs", database, time.monotonic() - started)
    if auth == "fab":
        from devstack.airflow_server import prepare_fab

        prepare_fab(env, home)
        password = fab_users(home)[ADMIN_USER]["password"]
    _write_private(home / SPEC_FILE, {"ports": {"redis": ports.redis, "api-server": ports.api,
                                                "listening": ports.listening()},
                                      "parts": part_commands(home, ports)})
    (home / STATE_FILE).unlink(missing_ok=True)
    with open(home / "topology.log", "ab") as log_file:
        supervisor = subprocess.Popen([sys.executable, "-m", "devstack.topology", "supervise", str(home)], env=env,
                                      cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
    (home / "topology.pid").write_text(str(supervisor.pid))
    topology = Topology(home, f"http://127.0.0.1:{ports.api}", ADMIN_USER, password, database, admin_dsn)
    try:
        topology.wait_ready(timeout)
    except BaseException:
        stop(home)
        raise
    return topology


def stop(home: Path, timeout: float = 60) -> list[str]:
    """Stop the supervisor (which stops its parts), then anything a killed supervisor left; return what is left."""
    from devstack.stack import stop_process_group

    home = home.resolve()
    state = json.loads((home / STATE_FILE).read_text()) if (home / STATE_FILE).exists() else {}
    pid_file = home / "topology.pid"
    if pid_file.exists():
        if _runs_in(int(pid_file.read_text()), home):
            stop_process_group(int(pid_file.read_text()), timeout)
        pid_file.unlink(missing_ok=True)
    for part in state.get("parts", {}).values():  # what a killed supervisor left: each part is a session
        if part.get("pid") and _session(part["pid"], home):
            _signal_session(part["pid"], signal.SIGTERM, home)
            deadline = time.monotonic() + 5
            while _session(part["pid"], home) and time.monotonic() < deadline:
                time.sleep(0.1)
            _signal_session(part["pid"], signal.SIGKILL, home)
    listening = state.get("ports", {}).get("listening", {})
    deadline = time.monotonic() + 10
    while any(port_is_open(port) for port in listening.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [f"port {port} ({name})" for name, port in listening.items() if port_is_open(port)]


def airflow_on_loopback(argv: list[str]) -> None:
    """Run the ``airflow`` CLI with its log server bound to 127.0.0.1.

    A Celery worker and the triggerer serve their task logs over HTTP, and Airflow binds that server to every
    interface with no setting to change it (airflow/utils/serve_logs/core.py). Production gives each its own
    container; here every part shares this machine, so the local parts that serve logs start through this.
    """
    import uvicorn
    from airflow.__main__ import main as airflow_main

    serve = uvicorn.run

    def run_on_loopback(app: Any, *args: Any, host: str = "127.0.0.1", **kwargs: Any) -> None:
        print(f"devstack.topology: the log server listens on 127.0.0.1:{kwargs.get('port')} only", flush=True)
        serve(app, *args, host="127.0.0.1", **kwargs)

    uvicorn.run = run_on_loopback
    sys.argv = ["airflow", *argv]
    sys.exit(airflow_main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["airflow"]:  # not through argparse: every argument belongs to airflow
        airflow_on_loopback(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m devstack.topology",
                                     description="Supervise the local Celery topology (started by make up "
                                                 "EXECUTOR=celery; see devstack/topology.py).")
    parser.add_argument("command", choices=["supervise"])
    parser.add_argument("home", type=Path, help="the Airflow home holding topology-spec.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    supervise(args.home.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
