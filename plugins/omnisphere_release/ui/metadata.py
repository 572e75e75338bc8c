"""Read what the Releases page shows from Airflow's metadata database, through the API server's ORM session.

Read only: SELECTs, never a write. A few set-based queries per request whatever the number of services (runs, their
task instances, their reports), so that the page stays fast with many services and releases.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from airflow.models.variable import Variable
from airflow.models.xcom import XComModel
from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session

from omnisphere_release.contracts import MONITORING_GATE, REPORT, WAIT_FOR_WINDOW
from omnisphere_release.release_queue import QUEUE_VARIABLE
from omnisphere_release.ui.calendar import WaitingRelease
from omnisphere_release.ui.history import RunRecord, TaskRecord

QUEUE_RELEASE_DAG = "queue_release"
# The XCom key under which monitoring_gate records its bake (operators/monitoring.py BAKE_XCOM_KEY; not imported:
# the operators' module brings the triggers and the AWS hooks into the API server).
BAKE_XCOM_KEY = "bake"
DEFERRED = "deferred"


def _xcom_value(row: XComModel) -> Any:
    value = XComModel.deserialize_value(row)
    if isinstance(value, str):  # stored by an older serializer as a JSON string
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def waiting_releases(session: Session, service_of_dag: dict[str, str]) -> list[WaitingRelease]:
    """Return the release runs of these DAGs deferred in wait_for_window, with the window their task decided on."""
    rows = session.execute(
        select(TaskInstance.dag_id, TaskInstance.run_id, DagRun.conf, DagRun.triggering_user_name)
        .join(DagRun, (DagRun.dag_id == TaskInstance.dag_id) & (DagRun.run_id == TaskInstance.run_id))
        .where(TaskInstance.task_id == WAIT_FOR_WINDOW, TaskInstance.state == DEFERRED,
               TaskInstance.dag_id.in_(list(service_of_dag)))
    ).all()
    if not rows:
        return []
    decisions = {(x.dag_id, x.run_id): _xcom_value(x) for x in session.scalars(
        select(XComModel).where(XComModel.task_id == WAIT_FOR_WINDOW, XComModel.key == "window",
                                tuple_(XComModel.dag_id, XComModel.run_id).in_([(r[0], r[1]) for r in rows])))}
    waiting = []
    for dag_id, run_id, conf, user in rows:
        conf = conf or {}
        decision = decisions.get((dag_id, run_id)) or {}
        waiting.append(WaitingRelease(
            dag_id=dag_id, run_id=run_id, service=service_of_dag[dag_id],
            window_start=decision.get("window_start"), window_end=decision.get("window_end"),
            mode=str(decision.get("mode") or "window"), image_tag=conf.get("image_tag"), triggered_by=user,
            reason=str(conf.get("reason") or ""), force_reason=str(decision.get("force_reason") or "")))
    return waiting


def release_queue(session: Session) -> dict[str, Any]:
    """Return the queued manifests by window, each with the user who triggered its queue_release run."""
    variable = session.scalar(select(Variable).where(Variable.key == QUEUE_VARIABLE))
    if variable is None:
        return {}
    try:
        queue = json.loads(variable.get_val() or "{}")
    except ValueError:
        return {}
    if not isinstance(queue, dict):
        return {}
    run_ids = [e.get("queued_by") for e in queue.values() if isinstance(e, dict) and e.get("queued_by")]
    users = dict(session.execute(select(DagRun.run_id, DagRun.triggering_user_name).where(
        DagRun.dag_id == QUEUE_RELEASE_DAG, DagRun.run_id.in_(run_ids))).all()) if run_ids else {}
    return {key: {**entry, "queued_by_user": users.get(str(entry.get("queued_by")))} if isinstance(entry, dict) else entry
            for key, entry in queue.items()}


def release_runs(session: Session, dag_ids: list[str], limit: int) -> dict[str, list[RunRecord]]:
    """Return the newest ``limit`` runs of each DAG, with their task instances and release reports."""
    if not dag_ids:
        return {}
    rank = func.row_number().over(partition_by=DagRun.dag_id, order_by=DagRun.run_after.desc()).label("rank")
    newest = select(DagRun.id, rank).where(DagRun.dag_id.in_(dag_ids)).subquery()
    runs = session.scalars(select(DagRun).join(newest, newest.c.id == DagRun.id).where(newest.c.rank <= limit)).all()
    found: dict[str, list[RunRecord]] = defaultdict(list)
    for record in _records(session, list(runs)):
        found[record.dag_id].append(record)
    return found


def release_run(session: Session, dag_id: str, run_id: str) -> RunRecord | None:
    """Return one run with its task instances and release report, or None."""
    run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    return _records(session, [run])[0] if run is not None else None


def _records(session: Session, runs: list[DagRun]) -> list[RunRecord]:
    """Return the runs as RunRecords: two more queries, for all their task instances and all their reports."""
    if not runs:
        return []
    run_ids = [r.id for r in runs]
    keys = [(r.dag_id, r.run_id) for r in runs]
    tasks: dict[tuple[str, str], list[TaskRecord]] = defaultdict(list)
    for ti in session.execute(select(TaskInstance.dag_id, TaskInstance.run_id, TaskInstance.task_id,
                                     TaskInstance.state, TaskInstance.try_number, TaskInstance.duration)
                              .where(tuple_(TaskInstance.dag_id, TaskInstance.run_id).in_(keys))).all():
        tasks[(ti.dag_id, ti.run_id)].append(TaskRecord(ti.task_id, ti.state, ti.try_number or 0, ti.duration))
    values: dict[tuple[int, str], Any] = {(x.dag_run_id, x.task_id): _xcom_value(x) for x in session.scalars(
        select(XComModel).where(XComModel.dag_run_id.in_(run_ids), XComModel.map_index == -1,
                                ((XComModel.task_id == REPORT) & (XComModel.key == "return_value"))
                                | ((XComModel.task_id == MONITORING_GATE) & (XComModel.key == BAKE_XCOM_KEY))))}

    def as_dict(value: Any) -> dict[str, Any] | None:
        return value if isinstance(value, dict) else None

    return [RunRecord(dag_id=run.dag_id, run_id=run.run_id, state=str(run.state) if run.state else None,
                      start=run.start_date, end=run.end_date, triggered_by=run.triggering_user_name,
                      conf=run.conf or {}, tasks=tasks[(run.dag_id, run.run_id)],
                      report=as_dict(values.get((run.id, REPORT))),
                      gate_bake=as_dict(values.get((run.id, MONITORING_GATE))))
            for run in runs]


def report_of(session: Session, dag_id: str, run_id: str) -> dict[str, Any] | None:
    """Return the release report a run's report task returned, or None."""
    row = session.scalar(select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run_id,
                                                 XComModel.task_id == REPORT, XComModel.key == "return_value",
                                                 XComModel.map_index == -1))
    value = _xcom_value(row) if row is not None else None
    return value if isinstance(value, dict) else None
