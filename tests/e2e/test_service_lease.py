"""One operation per service at a time, across DAGs: a release, a manual rollback, schema_migrations, data_migrations
and a release_all child never overlap on one service. The second is refused at its first task, naming the run that
holds the service, and changes nothing; a lease whose run has ended is taken over, so a crash never blocks for good.

A holder here is a run that is still going (a DagRun in state running in the metadata database) whose lease row is
in the service database: exactly what a real run leaves while it works, without having to stop one halfway.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

import boto3
import psycopg2
import pytest

from omnisphere_release.locks import LOCK_TABLE, Holder, ServiceLock
from tests.e2e.helpers import push_image, run_dag

pytestmark = pytest.mark.e2e
BILLING = "billing-service"  # the service with a data migration


def dsn(service: str) -> str:
    return os.environ[f"OMNI_PG_DSN_{service.upper().replace('-', '_')}"]


def lease(service: str) -> ServiceLock:
    return ServiceLock(service, lambda: psycopg2.connect(dsn(service)))


def state_of(service: str) -> dict:
    """What an operation would change: the schema history and the running task definition."""
    with psycopg2.connect(dsn(service)) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('omnisphere_schema_history') IS NOT NULL")
        history = []
        if cur.fetchone()[0]:
            cur.execute("SELECT version, state, applied_at FROM omnisphere_schema_history ORDER BY version")
            history = cur.fetchall()
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    live = ecs.describe_services(cluster="omnisphere", services=[service])["services"][0]
    return {"history": history, "task_definition": live["taskDefinition"]}


def hold(service: str, dag_id: str, state: str = "running", run_id: str | None = None) -> Holder:
    """Leave ``service`` held by a run of ``dag_id`` in ``state`` (its DagRun exists in the metadata database)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    run_id = run_id or f"manual__holder-{uuid.uuid4().hex[:8]}"
    with create_session() as session:
        session.add(DagRun(dag_id=dag_id, run_id=run_id, run_type="manual", state=state,
                           run_after=datetime.now(timezone.utc)))
    holder = Holder(dag_id, run_id, "first_task", f"test operation of {dag_id}")
    taken = lease(service).acquire(holder, is_over=lambda _: True)
    assert taken.holder.run_id == run_id
    return holder


@pytest.fixture()
def free_services(devstack, airflow_db):
    """No lease on any service before and after each test."""
    def clear() -> None:
        for service in ("auth-service", BILLING, "notification-service"):
            with psycopg2.connect(dsn(service)) as conn, conn.cursor() as cur:
                cur.execute(f"CREATE TABLE IF NOT EXISTS {LOCK_TABLE} (service text PRIMARY KEY, dag_id text, "
                            f"run_id text, task_id text, operation text, acquired_at timestamptz DEFAULT now())")
                cur.execute(f"DELETE FROM {LOCK_TABLE}")  # noqa: S608 - a constant table name

    clear()
    yield
    clear()


def release_conf(service: str) -> dict:
    tag = f"5.{uuid.uuid4().hex[:6]}"
    push_image(service, tag)
    return {"image_tag": tag, "bake_minutes": 0.1, "window": "now", "force_reason": "e2e: lease",
            "reason": "e2e: lease"}


# (contender DAG, its conf, its first task that acts on the service, the holder's DAG): every operation is refused
# while another kind holds the service, and each kind holds it once.
CONTENDERS = [
    ("release_auth-service", lambda: release_conf("auth-service"), "preflight", "rollback_auth-service"),
    ("rollback_auth-service", lambda: {"schema_version": 0, "reason": "e2e: lease"}, "plan", "schema_migrations"),
    ("schema_migrations", lambda: {"service": BILLING, "direction": "up", "dry_run": False, "reason": "e2e: lease"},
     "check_params", "data_migrations"),
    ("data_migrations", lambda: {"migration": f"{BILLING}/backfill_invoice_due_dates", "action": "run"},
     "data_migrate", "release_billing-service"),
    # A release_all child is a release_<service> run whose run id says which release_all started it.
    ("schema_migrations", lambda: {"service": "auth-service", "direction": "down", "target_version": 0,
                                   "dry_run": False, "reason": "e2e: lease"}, "check_params", "release_auth-service"),
]


@pytest.mark.parametrize(("dag_id", "conf", "first_task", "holder_dag"), CONTENDERS,
                         ids=[f"{c[3]}-holds-{c[0]}-refused" for c in CONTENDERS])
def test_a_second_operation_is_refused_at_its_first_task_naming_the_holder_and_changes_nothing(
        free_services, capfd, dag_id, conf, first_task, holder_dag):
    service = BILLING if "billing" in holder_dag or holder_dag == "data_migrations" else "auth-service"
    run_id = (f"scheduled__2026-12-06T01:00:00+00:00__{service}" if holder_dag.startswith("release_")
              else None)  # the run id release_all gives its children
    holder = hold(service, holder_dag, run_id=run_id)
    before = state_of(service)

    outcome = run_dag(dag_id, conf())

    assert outcome.state == "failed", outcome.tasks
    assert outcome.task(first_task) == "failed", outcome.tasks
    log = capfd.readouterr().out
    assert f"{service} is held by test operation of {holder_dag} (run {holder.run_id} of {holder_dag}" in log
    assert "Refused, nothing was changed" in log
    assert state_of(service) == before
    assert lease(service).holder().run_id == holder.run_id  # still the holder's


@pytest.mark.parametrize("holder_state", ["failed", "success", "deleted"])
def test_a_lease_whose_run_has_ended_is_taken_over(free_services, capfd, holder_state):
    # A worker killed mid-release leaves its lease behind; the run is failed by Airflow, and the lease with it.
    holder = hold("auth-service", "release_auth-service", state="failed" if holder_state == "deleted" else holder_state)
    if holder_state == "deleted":
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session

        with create_session() as session:
            session.query(DagRun).filter(DagRun.run_id == holder.run_id).delete()

    outcome = run_dag("schema_migrations", {"service": "auth-service", "dry_run": False, "reason": "e2e: lease"})

    assert outcome.state == "success", outcome.tasks
    assert f"auth-service: took over the lease of test operation of release_auth-service (run {holder.run_id}" \
        in capfd.readouterr().out


def test_a_dry_run_holds_nothing_and_is_not_refused(free_services):
    holder = hold("auth-service", "release_auth-service")
    outcome = run_dag("schema_migrations", {"service": "auth-service", "dry_run": True})
    assert outcome.state == "success", outcome.tasks
    assert lease("auth-service").holder().run_id == holder.run_id


def test_a_release_holds_the_service_for_its_run_and_frees_it_at_the_end(free_services):
    outcome = run_dag("release_auth-service", release_conf("auth-service"))
    assert outcome.state == "success", outcome.tasks
    assert lease("auth-service").holder() is None  # its report gave the lease up


def test_a_release_that_waited_for_its_window_is_refused_when_a_hotfix_went_first(free_services, capfd,
                                                                                   monkeypatch):
    """A hotfix may run beside a release waiting for its window (max_active_runs > 1, one at a time by the lease).
    When the waiting release wakes, its preflight sees that the service changed since it was triggered and refuses,
    so that it never deploys an older image over the hotfix. Here the service "ran something else" when the release
    was triggered: exactly what its wait_for_window recorded before a hotfix went first."""
    from omnisphere_release.operators.window import WaitForMaintenanceWindowOperator

    before_hotfix = "arn:aws:ecs:eu-west-1:123456789012:task-definition/auth-service:999"
    monkeypatch.setattr(WaitForMaintenanceWindowOperator, "_running_task_definition",
                        lambda self, service: before_hotfix)
    before = state_of("auth-service")
    assert before["task_definition"] != before_hotfix

    outcome = run_dag("release_auth-service", release_conf("auth-service"))

    assert outcome.state == "failed" and outcome.task("preflight") == "failed", outcome.tasks
    assert outcome.task("backup") == "upstream_failed"
    assert outcome.outputs["wait_for_window"]["task_definition_at_trigger"] == before_hotfix
    log = capfd.readouterr().out
    assert f"auth-service changed since this release was triggered: it ran {before_hotfix} then and runs " \
           f"{before['task_definition']} now" in log
    assert state_of("auth-service") == before


def test_release_dags_let_a_hotfix_run_beside_a_release_waiting_for_its_window():
    from tests.e2e.helpers import get_dag

    assert get_dag("release_auth-service").max_active_runs > 1
