"""A service's release history: one line per release run, from the run, its task instances and its release report.

No Airflow here: :mod:`omnisphere_release.ui.metadata` reads the runs (read only) into :class:`RunRecord`; this module
says what each one means to a release manager.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from omnisphere_release.contracts import MAIN_STAGES, RELEASE_FAILED, REPORT, ROLLBACK_STAGES, WAIT_FOR_WINDOW
from omnisphere_release.report import OUTCOME_TEXT
from omnisphere_release.ui.bake import bake_of, bake_summary

# Stages whose time is not the release's work: waiting for the window, and the bookkeeping at the end.
NOT_WORK = {WAIT_FOR_WINDOW, REPORT, RELEASE_FAILED}
IN_PROGRESS = "in_progress"
OUTCOMES = {**OUTCOME_TEXT, IN_PROGRESS: "IN PROGRESS (or waiting for its window)"}


@dataclass
class TaskRecord:
    task_id: str
    state: str | None
    try_number: int
    duration: float | None  # seconds


@dataclass
class RunRecord:
    dag_id: str
    run_id: str
    state: str | None
    start: datetime | None
    end: datetime | None
    triggered_by: str | None
    conf: dict[str, Any]
    tasks: list[TaskRecord] = field(default_factory=list)
    report: dict[str, Any] | None = None  # the report task's return value, when it ran
    # What monitoring_gate recorded of its bake (its XCom), for a run whose report has no bake: still running, or
    # reported before the report carried the bake.
    gate_bake: dict[str, Any] | None = None

    @property
    def bake(self) -> dict[str, Any] | None:
        return bake_of(self.report) or self.gate_bake


def run_path(dag_id: str, run_id: str) -> str:
    return f"/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def _outcome(record: RunRecord) -> str:
    if record.report and record.report.get("outcome") in OUTCOME_TEXT:
        return str(record.report["outcome"])
    if record.state not in ("success", "failed"):
        return IN_PROGRESS
    # No report (the report task could not run): the run's own state is all there is.
    return "released" if record.state == "success" else "failed"


def _slowest(record: RunRecord) -> dict[str, Any] | None:
    stages = [(s.get("stage"), s.get("seconds")) for s in (record.report or {}).get("stages", [])]
    if not stages:
        stages = [(t.task_id, t.duration) for t in record.tasks]
    timed = [(str(stage), float(seconds)) for stage, seconds in stages
             if stage not in NOT_WORK and isinstance(seconds, (int, float))]
    if not timed:
        return None
    stage, seconds = max(timed, key=lambda item: item[1])
    return {"stage": stage, "seconds": round(seconds, 1)}


def _failed_task(record: RunRecord) -> TaskRecord | None:
    """Return the first stage that failed (the cause; later failures are its consequences)."""
    order = {task_id: i for i, task_id in enumerate((*MAIN_STAGES, *ROLLBACK_STAGES))}
    failed = [t for t in record.tasks if t.state == "failed" and t.task_id in order]
    return min(failed, key=lambda t: order[t.task_id]) if failed else None


def release_entry(record: RunRecord, ui_base: str, api_base: str) -> dict[str, Any]:
    """Return one release as the history shows it: before -> after, outcome, time, who, and where to read more.

    ``ui_base`` is the path Airflow's UI is served under ("" at the root); ``api_base`` this app's mount path.
    """
    report = record.report or {}
    before, target, after = report.get("before") or {}, report.get("target") or {}, report.get("after") or {}
    outcome = _outcome(record)
    duration = (record.end - record.start).total_seconds() if record.start and record.end else None
    failed = _failed_task(record)
    path = run_path(record.dag_id, record.run_id)
    approval = report.get("approval")
    approval = approval if isinstance(approval, dict) else {}
    bake = bake_summary(record.bake)
    query = f"dag_id={quote(record.dag_id)}&run_id={quote(record.run_id, safe='')}"
    return {
        "dag_id": record.dag_id,
        "run_id": record.run_id,
        "state": record.state,
        "outcome": outcome,
        "outcome_text": OUTCOMES.get(outcome, outcome),
        "started": record.start.isoformat() if record.start else None,
        "ended": record.end.isoformat() if record.end else None,
        "duration_seconds": round(duration, 1) if duration is not None else None,
        "slowest_stage": _slowest(record),
        "before": {"image": before.get("image"), "schema_version": before.get("schema_version")},
        "target": {"image": target.get("image") or record.conf.get("image_tag"),
                   "image_digest": target.get("image_digest"), "schema_version": target.get("schema_version")},
        "after": {"image": after.get("image"), "schema_version": after.get("schema_version")},
        "image_tag": record.conf.get("image_tag"),
        "triggered_by": report.get("triggered_by") or record.triggered_by,
        "approved_by": approval.get("approved_by"),
        "approved_at": approval.get("approved_at"),
        "rejected_by": approval.get("rejected_by"),  # the approver who said no (the release changed nothing)
        "rejected_at": approval.get("rejected_at"),
        "reason": report.get("reason") or record.conf.get("reason") or "",
        "failed_task": failed.task_id if failed else None,
        "bake": bake,
        "links": {
            "run": f"{ui_base}{path}",
            "detail": f"{api_base}/release?{query}",
            "report": f"{api_base}/api/report?{query}" if record.report else None,
            "bake": f"{api_base}/api/bake?{query}" if bake else None,
            "bake_chart": f"{api_base}/api/bake.svg?{query}" if bake else None,
            "report_stored_at": report.get("stored_at"),
            "failed_task_log": f"{ui_base}{path}/tasks/{quote(failed.task_id)}?try_number={max(1, failed.try_number)}"
            if failed else None,
        },
    }


def service_history(records: list[RunRecord], ui_base: str, api_base: str) -> list[dict[str, Any]]:
    """Return the releases newest first (a run not started yet sorts first: it is the next thing to happen)."""
    not_started = [r for r in records if r.start is None]
    started = sorted((r for r in records if r.start is not None), key=lambda r: r.start or datetime.min, reverse=True)
    return [release_entry(r, ui_base, api_base) for r in (*not_started, *started)]
