"""What the stage operators share: the service they act on, and reading rendered templates."""

from __future__ import annotations

import re
from typing import Any

from airflow.sdk import BaseOperator, Context, Variable
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import Environment, Service
from omnisphere_release.hooks.postgres import ServiceDatabaseHook
from omnisphere_release.locks import FINISHED_RUN_STATES, Holder, ServiceBusy, ServiceLock, Taken
from omnisphere_release.logs import Log


def run_label(dag_id: str, run_id: str) -> str:
    """How a run signs what it does (schema_migrations' applied_by, a data migration's run_by): rollback_schema
    reverts only the versions its own run's schema_up signed, so both must spell it the same way."""
    return f"dag={dag_id} run={run_id}"


# The run's environment (param ``environment``), given to every operator through the DAG's default_args; a DAG
# without that param renders "", as an operator built without it has: the catalog's default environment.
ENVIRONMENT_TEMPLATE = "{{ params.get('environment') or '' }}"


def backup_bucket_of(environment: Environment) -> str:
    """Return the backup bucket of ``environment``: the Airflow Variable the catalog names for it ("" when unset)."""
    return str(Variable.get(environment.backup_bucket_variable, default="") or "")


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


def as_optional_text(value: Any) -> str | None:
    """Read a rendered template as optional text ("None" and "" mean none)."""
    return None if value is None or str(value) in {"None", ""} else str(value)


class ServiceStageOperator(BaseOperator):
    """A release stage that acts on one catalog service, named by ``service``, in the run's ``environment`` (both
    templated): ``catalog.get(self.service, self.environment)`` is the service with that environment's connections."""

    template_fields: tuple[str, ...] = ("service", "environment")

    def __init__(self, *, service: str, environment: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.environment = environment


def run_is_over(ti: Any, holder: Holder) -> bool:
    """Say whether the holder's DAG run has ended (or no longer exists): its lease may then be taken over."""
    try:
        state = ti.get_dagrun_state(holder.dag_id, holder.run_id)
    except Exception as exc:  # noqa: BLE001 - the API's error types differ between the runtime and dag.test
        if _not_found(exc):
            return True  # the run was deleted
        raise AirflowException(f"Cannot tell whether {holder.describe()} is still going: {exc}. Retrying if retries "
                               f"remain; nothing was changed.") from None
    return str(getattr(state, "value", state)) in FINISHED_RUN_STATES  # a DagRunState, or its value


def _not_found(exc: Exception) -> bool:
    """Say whether the Execution API answered 404: raised as ServerResponseError in process (dag.test), as
    AirflowRuntimeError carrying the status in its detail under a supervisor."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    detail = getattr(getattr(exc, "error", None), "detail", None)
    if status is None and isinstance(detail, dict):
        status = detail.get("status_code")
    return status == 404


def hold_service(context: Context, service: Service, operation: str, log: Log) -> Taken:
    """Take ``service``'s lease for this run (one operation per service at a time), or refuse the task for good,
    naming the run that holds it. Every task of a run may call it: the run's own lease is simply kept."""
    ti = context["ti"]
    me = Holder(ti.dag_id, ti.run_id, ti.task_id, operation)
    lease = ServiceLock(service.name, ServiceDatabaseHook(service.postgres_conn_id).get_conn)
    try:
        taken = lease.acquire(me, lambda holder: run_is_over(ti, holder))
    except ServiceBusy as exc:
        raise AirflowFailException(f"Refused, nothing was changed: {exc}") from None
    if taken.previous:
        log.info("%s: took over the lease of %s, whose run has ended.", service.name, taken.previous.describe())
    if not taken.already_held:
        log.info("%s is held by this run for: %s. No other release, rollback or migration of it starts until this "
                 "run ends.", service.name, operation)
    return taken


def release_service(context: Context, service: Service, log: Log) -> None:
    """Give ``service``'s lease up early, if this run holds it (a lease ends with its run anyway)."""
    ti = context["ti"]
    me = Holder(ti.dag_id, ti.run_id, ti.task_id, "")
    if ServiceLock(service.name, ServiceDatabaseHook(service.postgres_conn_id).get_conn).release(me):
        log.info("%s is free again for other operations.", service.name)
