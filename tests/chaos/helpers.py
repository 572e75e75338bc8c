"""What the chaos tests look at: a run and its tasks through the REST API, the service as it stands (ECS image, schema
version, a checksum of its tables), and, when an assertion fails, everything a reader needs to see why."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import psycopg2
from botocore.config import Config
from psycopg2 import sql

from devstack.aws import IMAGE_REPOSITORY
from tests.e2e.helpers import push_image

CLUSTER = "omnisphere"
BASE_VERSION = 3  # include/sql's auth-service has 4 migrations, the chaos SQL dir a 5th: a release applies 4 and 5
USERS = 40
# The test process's own AWS calls go through the same faulty endpoint as Airflow's: retry them generously.
PATIENT_AWS = Config(retries={"mode": "standard", "total_max_attempts": 12}, connect_timeout=3, read_timeout=10)
ENDED = ("success", "failed")
SERVICE = "auth-service"
STAGES = ("preflight", "backup", "schema_up", "integrity_check", "ecs_deploy", "smoke_test", "regression_test",
          "monitoring_gate", "finalize")
ROLLBACK = ("rollback_ecs", "rollback_schema", "restore_backup", "verify_rollback")


def aws(service: str) -> Any:
    return boto3.client(service, endpoint_url=os.environ["AWS_ENDPOINT_URL"], config=PATIENT_AWS)


def dsn_of(service: str) -> str:
    return os.environ[f"OMNI_PG_DSN_{service.upper().replace('-', '_')}"]


# ---- the service as it stands --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServiceState:
    """What a release changes: the ECS revision and image, the schema version, and the data (per table: its columns,
    its row count and an md5 of its rows in a stable order)."""

    task_definition: str
    image: str
    schema_version: int | None
    tables: dict[str, tuple[tuple[str, ...], int, str]] = field(repr=False)

    def columns(self) -> dict[str, tuple[str, ...]]:
        return {table: columns for table, (columns, _, _) in self.tables.items()}

    def checksums(self) -> dict[str, tuple[int, str]]:
        return {table: (rows, md5) for table, (_, rows, md5) in self.tables.items()}


def service_state(service: str, columns: dict[str, tuple[str, ...]] | None = None) -> ServiceState:
    """Read the service now. With ``columns`` (an earlier state's), checksum only those tables and columns: what a
    release that adds a column must keep intact."""
    ecs = aws("ecs")
    live = ecs.describe_services(cluster=CLUSTER, services=[service])["services"][0]
    definition = ecs.describe_task_definition(taskDefinition=live["taskDefinition"])["taskDefinition"]
    image = definition["containerDefinitions"][0]["image"]
    with psycopg2.connect(dsn_of(service)) as conn, conn.cursor() as cur:
        cur.execute("SELECT max(version) FROM omnisphere_schema_history WHERE state = 'applied'")
        version = cur.fetchone()[0]
        tables = table_checksums(cur, columns)
    conn.close()
    return ServiceState(live["taskDefinition"], image, version, tables)


def table_checksums(cur: Any, columns: dict[str, tuple[str, ...]] | None = None) -> dict[str, tuple[tuple[str, ...],
                                                                                                    int, str]]:
    """Return {table: (columns, rows, md5 of the rows sorted)} for the service's own tables (public, not the
    orchestrator's omnisphere_* bookkeeping)."""
    if columns is None:
        cur.execute("SELECT c.table_name, array_agg(c.column_name::text ORDER BY c.ordinal_position) "
                    "FROM information_schema.columns c JOIN information_schema.tables t USING (table_schema, "
                    "table_name) WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' "
                    "AND c.table_name NOT LIKE 'omnisphere%%' GROUP BY c.table_name")
        columns = {table: tuple(names) for table, names in cur.fetchall()}
    found = {}
    for table, names in sorted(columns.items()):
        row = sql.SQL("ROW({})::text").format(sql.SQL(", ").join(map(sql.Identifier, names)))
        cur.execute(sql.SQL("SELECT count(*), coalesce(md5(string_agg(r, E'\\n' ORDER BY r)), '') "
                            "FROM (SELECT {} AS r FROM {}) rows").format(row, sql.Identifier(table)))
        rows, md5 = cur.fetchone()
        found[table] = (names, rows, md5)
    return found


def reset_service(service: str, version: int, migrate: Callable[[list[str]], int]) -> None:
    """Put ``service``'s schema at ``version`` with known data: the start of every chaos test."""
    with psycopg2.connect(dsn_of(service)) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('omnisphere_schema_history') IS NOT NULL")
        if cur.fetchone()[0]:
            cur.execute("SELECT max(version) FROM omnisphere_schema_history WHERE state = 'applied'")
            current = cur.fetchone()[0]
        else:
            current = None
    conn.close()
    if current is not None and current > version:
        assert migrate([service, "down", "--to", str(version), "--reason", "chaos test reset"]) == 0
    elif current is None or current < version:
        assert migrate([service, "up", "--to", str(version), "--reason", "chaos test reset"]) == 0
    if service != "auth-service":
        return
    with psycopg2.connect(dsn_of(service)) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE users RESTART IDENTITY CASCADE")
        cur.executemany("INSERT INTO users (email, password_hash) VALUES (%s, %s) RETURNING id",
                        [(f"user{i}@example.com", f"hash-{i}") for i in range(USERS)])
        cur.execute("INSERT INTO sessions (id, user_id, user_agent, expires_at) SELECT gen_random_uuid(), id, "
                    "'chaos', now() + interval '1 day' FROM users WHERE id % 2 = 0")
        cur.execute("INSERT INTO api_tokens (user_id, token_sha256, scopes) SELECT id, sha256(email::bytea), "
                    "'{read}' FROM users WHERE id % 5 = 0")
    conn.close()


def scale_service(service: str, desired: int) -> None:
    """Set the ECS service's desired task count (no deployment): a bigger service rolls out for longer."""
    aws("ecs").update_service(cluster=CLUSTER, service=service, desiredCount=desired)


# ---- a run, through the REST API -----------------------------------------------------------------------------------
class Release:
    """One release_<service> run on the topology, and what a test needs to watch it and explain it."""

    def __init__(self, topo: Any, client: Any, service: str) -> None:
        self.topo, self.client, self.service = topo, client, service
        self.dag_id = f"release_{service}"
        self.run_id = ""
        self.tag = ""
        self.digest = ""

    def trigger(self, tag_suffix: str = "", before_run: Callable[[], object] | None = None, **conf: Any) -> Release:
        """Push a new image (as CI does), call ``before_run`` (a fault for the whole run), trigger the run."""
        self.tag = f"9.{uuid.uuid4().hex[:6]}{tag_suffix}"
        self.digest = push_image(self.service, self.tag)
        if before_run is not None:
            before_run()
        body = {"logical_date": None, "conf": {"image_tag": self.tag, "window": "now", "bake_minutes": 0.1,
                                               "force_reason": "chaos test", "reason": "chaos test", **conf}}
        response = self.client.post(f"/dags/{self.dag_id}/dagRuns", json=body)
        assert response.status_code == 200, response.text
        self.run_id = response.json()["dag_run_id"]
        return self

    def tis(self) -> dict[str, dict[str, Any]]:
        response = self.client.get(f"/dags/{self.dag_id}/dagRuns/{self.run_id}/taskInstances")
        response.raise_for_status()
        return {ti["task_id"]: ti for ti in response.json()["task_instances"]}

    def states(self) -> dict[str, str | None]:
        return {task: ti["state"] for task, ti in self.tis().items()}

    def run_state(self) -> str:
        return self.client.get(f"/dags/{self.dag_id}/dagRuns/{self.run_id}").json()["state"]

    def wait_for_task(self, task_id: str, until: Callable[[dict[str, Any]], bool], what: str,
                      timeout: float = 180, poll: float = 0.25) -> dict[str, Any]:
        """Poll the task instance until ``until(ti)``; fail, explained, if the run ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ti = self.tis().get(task_id)
            except Exception:  # noqa: BLE001 - the API server may be restarting with the database: look again
                ti = None
            if ti is not None and until(ti):
                return ti
            if ti is not None and self.run_state() in ENDED:
                raise AssertionError(f"the run ended before {task_id} was {what}\n" + self.explain(task_id))
            time.sleep(poll)
        raise AssertionError(f"{task_id} was not {what} within {timeout:.0f}s\n" + self.explain(task_id))

    def wait_running(self, task_id: str, timeout: float = 180) -> dict[str, Any]:
        return self.wait_for_task(task_id, lambda ti: ti["state"] == "running" and bool(ti.get("pid")),
                                  "running (with a pid)", timeout)

    def wait_until_end(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            try:
                state = self.run_state()
            except Exception:  # noqa: BLE001 - see wait_for_task
                state = "unknown"
            if state in ENDED:
                return state
            time.sleep(1)
        raise AssertionError(f"{self.dag_id} {self.run_id} still {state} after {timeout:.0f}s\n" + self.explain())

    def xcom(self, task_id: str) -> Any:
        entry = self.client.get(f"/dags/{self.dag_id}/dagRuns/{self.run_id}/taskInstances/{task_id}/xcomEntries/"
                                "return_value", params={"deserialize": True}).json()
        value = entry.get("value")
        return json.loads(value) if isinstance(value, str) else value

    # -- logs and the explanation of a failure
    def task_log(self, task_id: str) -> str:
        """Every attempt's log of a task, and its trigger's, as the worker and the triggerer wrote them."""
        folder = self.topo.home / "logs" / f"dag_id={self.dag_id}" / f"run_id={self.run_id}" / f"task_id={task_id}"
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
        return "\n".join(f"--- {p.relative_to(folder)}\n" + _log_text(p) for p in files)

    def explain(self, *tasks: str) -> str:
        """The states (and tries, hosts) of every task, the log tails of ``tasks`` (or of the failed ones), and the
        tails of the topology's own log: what a reader of a failed assertion needs."""
        try:
            tis = self.tis()
            lines = [f"run {self.dag_id} {self.run_id}: {self.run_state()}"]
            lines += [f"  {task:16} {ti['state']!s:16} try {ti.get('try_number')} on {ti.get('hostname') or '-'}"
                      for task, ti in tis.items()]
        except Exception as exc:  # noqa: BLE001 - explaining must not hide the failure it explains
            tis, lines = {}, [f"(could not read the run: {exc})"]
        shown = tasks or tuple(t for t, ti in tis.items() if ti["state"] in ("failed", "up_for_retry"))
        for task in shown:
            lines.append(f"--- log of {task} (tail):\n{self.task_log(task)[-4000:]}")
        lines.append(f"--- {self.topo.home / 'topology.log'} (tail):\n{_tail(self.topo.home / 'topology.log', 1500)}")
        return "\n".join(lines)


def _log_text(path: Path) -> str:
    """A task log file as text: Airflow 3 writes JSON lines (event, level, timestamp); show them as plain lines."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        if isinstance(record, dict):
            out.append(f"{record.get('timestamp', '')} {record.get('level', '')} {record.get('event', '')}"
                       + (f" {record['error_detail']}" if record.get("error_detail") else ""))
        else:
            out.append(line)
    return "\n".join(out)


def _tail(path: Path, size: int) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else "(none)"


def worker_of(topo: Any, ti: dict[str, Any]) -> str:
    """The worker part (worker1 or worker2) that runs a task instance: by its process, else by its hostname."""
    part = topo.part_of(ti["pid"]) if ti.get("pid") else None
    if part in ("worker1", "worker2"):
        return part
    hostname = ti.get("hostname") or ""
    for worker in ("worker1", "worker2"):
        if hostname.startswith(f"{worker}@"):
            return worker
    raise AssertionError(f"cannot tell which worker runs {ti['task_id']} (pid {ti.get('pid')}, hostname "
                         f"{hostname!r}, part {part!r}); topology: {topo.state().get('parts')}")


def run_sql(service: str, statement: str, params: Iterable[Any] = ()) -> list[tuple]:
    """Run one statement (autocommit) on a service's database and return its rows, if any. (Takes the service, not
    its DSN: a failing test's traceback shows the arguments of every frame.)"""
    conn = psycopg2.connect(dsn_of(service))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, list(params))
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def wait_for_pg_sleep(service: str, timeout: float = 60) -> None:
    """Wait until a session of the service's database sleeps in pg_sleep (a slow step of a chaos test: a check or
    a down file), whatever statement it is in (a server-side cursor's FETCH runs it too)."""
    deadline = time.monotonic() + timeout
    while not run_sql(service, "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                               "AND wait_event = 'PgSleep'"):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f}s for a session of {service} in pg_sleep; none was")
        time.sleep(0.2)


def deployments_to(service: str, task_definition: str) -> list[dict[str, Any]]:
    """The ECS service deployments that moved ``service`` to ``task_definition`` (one per release, retries
    included, or a retry started a second one)."""
    listed = aws("ecs").list_service_deployments(cluster=CLUSTER, service=service, maxResults=100)
    return [d for d in listed["serviceDeployments"] if d.get("targetServiceRevisionArn") == task_definition]


def assert_released(release: Release, before: ServiceState) -> ServiceState:
    """The run is green, every stage ran and no rollback did; the service runs the release's image at version 5
    with every row it had (the checksum of the tables and columns it had before)."""
    states = release.states()
    explain = release.explain()
    assert release.run_state() == "success", explain
    assert {s: states[s] for s in STAGES} == dict.fromkeys(STAGES, "success"), explain
    assert {s: states[s] for s in ROLLBACK} == dict.fromkeys(ROLLBACK, "skipped"), explain
    after = service_state(SERVICE, before.columns())
    assert after.image == f"{IMAGE_REPOSITORY}/{SERVICE}@{release.digest}", explain
    assert after.task_definition != before.task_definition
    assert after.schema_version == 5, explain
    changed = {t: (before.checksums().get(t), rows) for t, rows in after.checksums().items()
               if rows != before.checksums().get(t)}
    assert not changed, f"rows changed by the release (table: (rows, md5) before, after): {changed}"
    report = release.xcom("report")
    assert report["outcome"] == "released" and report["after"]["task_definition"] == after.task_definition
    return after
