"""The devstack: PostgreSQL, a moto server with the ECS deployment simulator, and one sample service per catalog entry.

``python -m devstack start`` runs the stack in the background (its own process group), returns when it is ready and
writes ``<state>/env``; ``python -m devstack stop`` stops the group and checks that no process or port is left.
``python -m devstack faults`` acts on a running stack through its state folder (devstack/faults.py).
Tests use the same code through the session fixture in tests/conftest.py, with a state folder of their own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from devstack import aws as local_aws
from devstack.faults import FAULTS_FILE
from devstack.net import free_port, port_is_open

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = REPO / ".devstack"

log = logging.getLogger("devstack")


# ---- the stack itself, run in the foreground by ``python -m devstack run`` -------------------------------------------
def run(state_dir: Path) -> None:
    """Start every part, write the env file, then serve until SIGTERM and stop every part."""
    sys.path.insert(0, str(REPO / "plugins"))
    from devstack.postgres import LocalPostgres
    from omnisphere_release.catalog import load_catalog

    state_dir.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    started = time.monotonic()
    postgres = LocalPostgres(state_dir, free_port())
    aws = None
    try:
        postgres.start()
        postgres.wait_ready()
        # One database per service per environment: auth_service (the default environment's, as always),
        # auth_service_production...
        dsns = {key: postgres.create_database(key.replace("-", "_"))
                for key in (local_aws.sample_key(service, environment)
                            for environment, service in local_aws.deployments(catalog))}
        log.info("PostgreSQL ready on 127.0.0.1:%d with %d databases (%d environments)", postgres.port, len(dsns),
                 len(catalog.environments))

        faults_file = state_dir / FAULTS_FILE
        faults_file.unlink(missing_ok=True)  # a new stack starts without the faults a previous one was given
        aws = local_aws.start(catalog, faults_file=faults_file)
        log.info("local AWS endpoint ready on 127.0.0.1:%d", aws.port)
        env = stack_env(state_dir, catalog, dsns, postgres.superuser_dsn(), aws.endpoint, aws.sample_ports,
                        aws.credentials, aws.test_listener_ports)
        write_env(state_dir / "env", env)
        (state_dir / "state.json").write_text(json.dumps({
            "pid": os.getpid(), "pgdata": str(postgres.data_dir), "ports": {
                "postgres": postgres.port, "aws": aws.port, "aws-internal": aws.internal_port,
                **{f"sample:{name}": port for name, port in aws.sample_ports.items()},
                **{f"test-listener:{name}": port for name, port in aws.test_listener_ports.items()}},
        }, indent=2))
        (state_dir / "ready").write_text(f"{time.monotonic() - started:.1f}\n")
        log.info("devstack ready in %.1fs; env in %s", time.monotonic() - started, state_dir / "env")
        while not stopping.wait(timeout=1):
            pass
    finally:
        log.info("devstack stopping")
        if aws is not None:
            aws.stop()
        postgres.stop()
        log.info("stopped PostgreSQL")
        (state_dir / "ready").unlink(missing_ok=True)


def stack_env(state_dir: Path, catalog: Any, dsns: dict[str, str], admin_dsn: str, endpoint: str,
              sample_ports: dict[str, int], aws_credentials: tuple[str, str],
              test_listener_ports: dict[str, int] | None = None) -> dict[str, str]:
    """Return the environment that points Airflow, the tests and any script at this stack.

    ``dsns`` and ``sample_ports`` are keyed by :func:`devstack.aws.sample_key` (the service name plus its
    environment's connection suffix). The default environment's keys are as they always were (OMNI_PG_DSN_<SERVICE>,
    OMNI_SAMPLE_URL_<SERVICE>); another environment's end with its connection suffix (OMNI_PG_DSN_<SERVICE>_PRODUCTION).
    """
    airflow_home = Path(os.environ.get("OMNI_AIRFLOW_HOME") or (REPO / ".airflow"))
    env = {
        "OMNI_DEVSTACK_DIR": str(state_dir),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AWS_DEFAULT_REGION": local_aws.REGION,
        "AWS_ACCESS_KEY_ID": aws_credentials[0],
        "AWS_SECRET_ACCESS_KEY": aws_credentials[1],
        "AWS_ENDPOINT_URL": endpoint,
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({
            "conn_type": "aws", "login": aws_credentials[0], "password": aws_credentials[1],
            "extra": {"region_name": local_aws.REGION, "endpoint_url": endpoint},
        }),
        f"AIRFLOW_VAR_{catalog.evidence_bucket_variable.upper()}": local_aws.EVIDENCE_BUCKET,
        "OMNI_PG_BIN_DIR": str(_pg_bin()),
        # The local server's superuser, for tests that create scratch databases. Local stack only.
        "OMNI_PG_ADMIN_DSN": admin_dsn,
        # rehearse_<service>'s scratch server (a role that may create databases): locally, the same server.
        "AIRFLOW_CONN_OMNI_PG_REHEARSAL": admin_dsn.replace("postgresql://", "postgres://", 1),
    }
    for environment in catalog.environments:
        env[f"AIRFLOW_VAR_{environment.backup_bucket_variable.upper()}"] = local_aws.backup_bucket(catalog, environment)
    for environment, service in local_aws.deployments(catalog):
        key = local_aws.sample_key(service, environment)
        suffix = service.env_suffix + environment.connection_suffix.upper()
        env[f"OMNI_PG_DSN_{suffix}"] = dsns[key]
        env[f"AIRFLOW_CONN_{service.postgres_conn_id.upper()}"] = dsns[key].replace("postgresql://", "postgres://", 1)
        # The extra (the URI's query) names the load balancer's test listener: where smoke_test tests green before a
        # blue/green switch.
        test_port = (test_listener_ports or {}).get(key)
        query = f"?test_listener_port={test_port}" if test_port else ""
        env[f"AIRFLOW_CONN_{service.http_conn_id.upper()}"] = f"http://127.0.0.1:{sample_ports[key]}{query}"
        env[f"OMNI_SAMPLE_URL_{suffix}"] = f"http://127.0.0.1:{sample_ports[key]}"
    return env


def _pg_bin() -> Path:
    from devstack.postgres import bin_dir

    return bin_dir()


def write_env(path: Path, env: dict[str, str]) -> None:
    lines = ["# Written by `make devstack`; load with: . .devstack/env", *(
        f"export {key}={shlex.quote(value)}" for key, value in env.items())]
    path.touch(mode=0o600)
    path.chmod(0o600)  # it holds the local databases' passwords
    path.write_text("\n".join(lines) + "\n")


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


# ---- background control ------------------------------------------------------------------------------------------
def start(state_dir: Path = DEFAULT_STATE_DIR, timeout: float = 120) -> dict[str, str]:
    """Start the stack in its own process group unless it runs already; return its environment."""
    state_dir = state_dir.resolve()
    if is_running(state_dir):
        return read_env(state_dir / "env")
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "ready").unlink(missing_ok=True)
    log_file = open(state_dir / "devstack.log", "ab")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack", "run", "--state-dir", str(state_dir)],
        cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    (state_dir / "pid").write_text(str(process.pid))
    deadline = time.monotonic() + timeout
    while not (state_dir / "ready").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop(state_dir)
            tail = (state_dir / "devstack.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"devstack did not start (see {state_dir / 'devstack.log'}):\n{tail}")
        time.sleep(0.2)
    return read_env(state_dir / "env")


def is_running(state_dir: Path) -> bool:
    pid_file = state_dir / "pid"
    if not (state_dir / "ready").exists() or not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


def stop(state_dir: Path = DEFAULT_STATE_DIR, timeout: float = 30) -> list[str]:
    """Stop the stack's process group and PostgreSQL; return what was still left (empty when clean)."""
    state_dir = state_dir.resolve()
    pid_file = state_dir / "pid"
    state = json.loads((state_dir / "state.json").read_text()) if (state_dir / "state.json").exists() else {}
    if pid_file.exists():
        stop_process_group(int(pid_file.read_text()), timeout)
        pid_file.unlink(missing_ok=True)
    pgdata = Path(state.get("pgdata", state_dir / "pgdata"))
    if (pgdata / "postmaster.pid").exists():  # the runner was killed before it could stop PostgreSQL
        from devstack.postgres import LocalPostgres

        LocalPostgres(state_dir, 0).stop()
    (state_dir / "ready").unlink(missing_ok=True)
    leftovers = [f"port {port} ({name})" for name, port in state.get("ports", {}).items()
                 if _wait_closed(port)]
    return leftovers


def stop_process_group(pid: int, timeout: float = 30) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left; return when the group is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        _signal_group(pid, sig)
        deadline = time.monotonic() + wait
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _group_alive(pid):
            return
        log.warning("process group %d still alive %.0fs after %s", pid, wait, sig.name)


def _wait_closed(port: int, timeout: float = 10) -> bool:
    """Return True when ``port`` still accepts connections after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while port_is_open(port):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)
    return False


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _group_alive(pid: int) -> bool:
    # Reap the runner when it is our own child (tests), or it lingers as a zombie in its group.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True
