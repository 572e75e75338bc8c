"""What every stage needs from its run: the outputs of earlier stages and the states of the run's tasks."""

from __future__ import annotations

import re
from typing import Any

from airflow.sdk import BaseOperator

WAIT_FOR_WINDOW = "wait_for_window"
PREFLIGHT = "preflight"
BACKUP = "backup"
SCHEMA_UP = "schema_up"
DATA_MIGRATE = "data_migrate"
INTEGRITY_CHECK = "integrity_check"
ECS_DEPLOY = "ecs_deploy"
SMOKE_TEST = "smoke_test"
MONITORING_GATE = "monitoring_gate"
FINALIZE = "finalize"
ROLLBACK_ECS = "rollback_ecs"
ROLLBACK_SCHEMA = "rollback_schema"
RESTORE_BACKUP = "restore_backup"
VERIFY_ROLLBACK = "verify_rollback"
RELEASE_FAILED = "release_failed"
REPORT = "report"
MAIN_STAGES = (WAIT_FOR_WINDOW, PREFLIGHT, BACKUP, SCHEMA_UP, DATA_MIGRATE, INTEGRITY_CHECK, ECS_DEPLOY, SMOKE_TEST, MONITORING_GATE,
               FINALIZE)
ROLLBACK_STAGES = (ROLLBACK_ECS, ROLLBACK_SCHEMA, RESTORE_BACKUP, VERIFY_ROLLBACK)


def stage_output(context: Any, task_id: str) -> Any:
    """Return what ``task_id`` returned in this run, or None if it returned nothing (failed, skipped, not run)."""
    return context["ti"].xcom_pull(task_ids=task_id)


def run_task_states(context: Any) -> dict[str, str]:
    """Return the state of every task of this run, by task id (``none`` for tasks not yet run)."""
    ti = context["ti"]
    states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id])
    per_run = states.get(ti.run_id, states) if isinstance(states, dict) else {}
    return {task_id: str(state or "none") for task_id, state in per_run.items()}


def failed_stages(states: dict[str, str]) -> list[str]:
    return [stage for stage in MAIN_STAGES if states.get(stage) == "failed"]


def safe_key(text: str) -> str:
    """Make a run id usable in an S3 key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:120]


def as_bool(value: Any) -> bool:
    """Read a rendered template as a boolean ("True", "false", True...)."""
    return value if isinstance(value, bool) else str(value).strip().lower() in {"true", "1", "yes"}


def as_optional_int(value: Any) -> int | None:
    """Read a rendered template as an optional integer ("None" and "" mean none)."""
    if value is None or str(value).strip() in {"", "None", "null"}:
        return None
    return int(value)


class ServiceStageOperator(BaseOperator):
    """A release stage that acts on one catalog service, named by ``service`` (templated)."""

    template_fields: tuple[str, ...] = ("service",)

    def __init__(self, *, service: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
