"""One Celery topology (devstack/topology.py) for every chaos test: starting one takes about a minute, so the package
shares it, and stops it (dropping its metadata database) when the package is done.

What the topology gets, beyond `make up EXECUTOR=celery`:

- a catalog with short bakes and deadlines (and notification-service with a 15 s missing_data_minutes, for the outage
  that outlasts it);
- a scratch SQL folder with a 5th auth-service migration whose down file sleeps while the schema
  ``chaos_slow_rollback`` exists: time to kill the worker in the middle of rollback_schema;
- a pg_dump that sleeps while ``<home>/slow-pg_dump`` exists: time to kill the worker in the middle of backup;
- heartbeats and health thresholds in seconds, not minutes: a killed task is found (and retried) 20 s after its
  worker died, a killed triggerer's triggers are taken over 10 s after its last heartbeat.

Each test starts from auth-service at version 3 with known rows, and ends with every fault cleared.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SLOW_PG_DUMP_SECONDS = 10
SLOW_ROLLBACK_SECONDS = 10
SLOW_ROLLBACK_FLAG = "chaos_slow_rollback"  # a schema: while it exists, 005's down file sleeps
HEARTBEAT_TIMEOUT = 20
# Settings of the test topology only: how fast Airflow notices a part that died. Production keeps the defaults.
FAST_DETECTION = {
    # A task whose process died is failed (and retried) once it missed heartbeats this long (default 300 s).
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
    # A killed triggerer's triggers go to a live triggerer once its heartbeat is this old (default 30 s).
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
    "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
    # A restarted scheduler adopts the tasks its killed predecessor queued (default every 300 s).
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: faults injected into the Celery topology while a release runs "
                                       "(killed parts, AWS faults and outages, a PostgreSQL restart); slow")


@dataclass
class Chaos:
    """The shared topology and what the tests act on."""

    topo: Any
    client: Any
    home: Path
    sql_dir: Path
    state_dir: Path  # the devstack's: faults.set_aws_faults / restart_postgres act on it
    migrate: Any  # omni-migrate's main, on the chaos catalog and SQL folder

    @property
    def slow_pg_dump(self) -> Path:
        return self.home / "slow-pg_dump"

    @property
    def checks(self) -> Path:
        return self.sql_dir / "auth-service" / "checks"

    def metadata(self, query: str, params: list[Any]) -> list[tuple]:
        """Rows of a query on the topology's Airflow metadata database (what the REST API does not show)."""
        import psycopg2

        conn = psycopg2.connect(self.topo.admin_dsn, dbname=self.topo.database)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall()
        finally:
            conn.close()

    def trigger_of(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any] | None:
        """The trigger a deferred task waits on: its id, the triggerer job running it, and its kwargs (decrypted with
        the deployment's Fernet key, as the triggerer reads them)."""
        from cryptography.fernet import Fernet

        rows = self.metadata("SELECT t.id, t.triggerer_id, t.kwargs FROM task_instance ti JOIN trigger t "
                             "ON t.id = ti.trigger_id WHERE ti.dag_id = %s AND ti.run_id = %s AND ti.task_id = %s",
                             [dag_id, run_id, task_id])
        if not rows:
            return None
        trigger_id, triggerer_id, stored = rows[0]
        if not stored.startswith("{"):
            key = json.loads((self.home / "topology-secrets.json").read_text())["AIRFLOW__CORE__FERNET_KEY"]
            stored = Fernet(key.encode()).decrypt(stored.encode()).decode()
        return {"id": trigger_id, "triggerer_id": triggerer_id, "kwargs": _plain(json.loads(stored))}


def _plain(value: Any) -> Any:
    """Airflow's serialized form ({"__type": ..., "__var": ...}) as plain values."""
    if isinstance(value, dict):
        if "__var" in value and "__type" in value:
            return _plain(value["__var"])
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def write_catalog(home: Path) -> Path:
    catalog = yaml.safe_load((REPO / "include" / "services.yaml").read_text())
    for service in catalog["services"]:
        service["deploy"]["bake_minutes"] = 0.1
        # One bake at 100 % per release, as these scenarios time their faults against it (canary steps, each with a
        # bake of its own, have their own end-to-end tests).
        service["deploy"].pop("steps", None)
        service["smoke_deadline_seconds"] = 4
        if service["name"] == "notification-service":
            service["monitoring"]["missing_data_minutes"] = 0.25
    path = home / "services.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


def write_sql_dir(home: Path) -> Path:
    sql_dir = home / "sql"
    shutil.copytree(REPO / "include" / "sql", sql_dir)
    migrations = sql_dir / "auth-service" / "migrations"
    (migrations / "005_chaos_audit.up.sql").write_text(
        "-- The chaos tests' own migration: an empty table, so that a release has a 5th version to revert.\n"
        "CREATE TABLE chaos_audit (id bigint PRIMARY KEY, note text);\n")
    (migrations / "005_chaos_audit.down.sql").write_text(
        f"-- Slow while the schema {SLOW_ROLLBACK_FLAG} exists: a chaos test kills the worker meanwhile.\n"
        f"SELECT pg_sleep({SLOW_ROLLBACK_SECONDS}) FROM pg_namespace WHERE nspname = '{SLOW_ROLLBACK_FLAG}';\n"
        "DROP TABLE chaos_audit;\n")
    return sql_dir


def write_pg_bin(home: Path, real_bin: Path) -> Path:
    """The devstack's PostgreSQL programs, with a pg_dump that sleeps before a backup while a flag file exists."""
    folder = home / "pg-bin"
    folder.mkdir()
    for program in real_bin.iterdir():
        (folder / program.name).symlink_to(program)
    (folder / "pg_dump").unlink()
    wrapper = folder / "pg_dump"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# pg_dump, slow for the chaos tests while the flag file exists: time to kill the worker mid-backup.\n"
        f'case " $* " in *" --format=custom "*) [ -e "{home / "slow-pg_dump"}" ] && sleep {SLOW_PG_DUMP_SECONDS};; esac\n'
        f'exec "{real_bin / "pg_dump"}" "$@"\n')
    wrapper.chmod(0o755)
    return folder


@pytest.fixture(scope="package")
def chaos(devstack, secret_watch) -> Iterator[Chaos]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server): the Celery topology needs it")
    from devstack import topology as local_topology
    from devstack.net import free_port

    home = Path(tempfile.mkdtemp(prefix="omni-chaos-"))
    catalog, sql_dir = write_catalog(home), write_sql_dir(home)
    pg_bin = write_pg_bin(home, Path(devstack["OMNI_PG_BIN_DIR"]))
    mine = {"OMNISPHERE_CATALOG": str(catalog), "OMNISPHERE_SQL_DIR": str(sql_dir)}
    saved = {key: os.environ.get(key) for key in mine}
    os.environ.update(mine)  # this process's migrations CLI and reads see what the topology sees
    database = f"airflow_chaos_{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    topo = local_topology.start(devstack, home, free_port(), database=database,
                                extra_env={**mine, "OMNI_PG_BIN_DIR": str(pg_bin), **FAST_DETECTION})
    saved_db = json.loads((home / local_topology.DB_FILE).read_text())
    secret_watch.watch_env({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql://{database}:{saved_db['password']}@x/"})
    client = topo.client()
    try:
        deadline = time.monotonic() + 120
        while client.get("/dags/release_auth-service").status_code != 200:
            assert time.monotonic() < deadline, f"the DAG processor did not parse the DAGs in time: {topo.log('dag-processor')}"
            time.sleep(1)
        print(f"chaos topology ready in {time.monotonic() - started:.1f}s")
        from omnisphere_release.migrations.__main__ import main as migrate

        yield Chaos(topo, client, home, sql_dir, Path(devstack["OMNI_DEVSTACK_DIR"]), migrate)
    finally:
        client.close()
        leftovers = topo.stop(drop_database=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        secret_watch.scan_logs("chaos topology log", home / "logs", *home.glob("*.log"))
        shutil.rmtree(home, ignore_errors=True)
        assert leftovers == [], f"still listening after the chaos topology stopped: {leftovers}"


@pytest.fixture()
def fresh(chaos: Chaos) -> Iterator[Chaos]:
    """auth-service at version 3 with known rows; afterwards, every fault and slow step of the test undone."""
    from devstack import faults
    from tests.chaos.helpers import BASE_VERSION, reset_service

    reset_service("auth-service", BASE_VERSION, chaos.migrate)
    try:
        yield chaos
    finally:
        faults.clear_aws_faults(chaos.state_dir)
        chaos.slow_pg_dump.unlink(missing_ok=True)
        for check in chaos.checks.glob("zz_chaos_*.sql"):
            check.unlink()
