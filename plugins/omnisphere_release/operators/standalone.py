"""The guards of the standalone paths: ``schema_migrations`` and ``data_migrations`` change a production database the
way a release does, inside the service's maintenance window (or by a recorded choice) and after a verified backup.

A release has these guards as stages of its own (``wait_for_window``, ``backup``). Here they run inside the task that
makes the change, per service, because ``schema_migrations all`` migrates in waves and the services of one wave can have
different windows: with a wait task per wave, a service whose window opened on Sunday would be migrated on Tuesday,
when the wave's last window opened. So each mapped task waits (deferred) for its own service's window, takes the
lease, backs the database up, then changes it, and the next wave starts once every service of this one is done.

Outside production (the run's param ``environment`` names an environment the catalog does not mark ``production``)
the guards are off: the change runs at
once and no backup is taken. A dry run, a pause request, and a run with nothing to change need no guard anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from botocore.exceptions import BotoCoreError, ClientError

from omnisphere_release.catalog import Catalog, Environment, Service, load_catalog
from omnisphere_release.checks import (
    Refused,
    decide_window,
    plain_text,
    schedule_of,
    unknown_conf_problem,
)
from omnisphere_release.contracts import WindowDecision
from omnisphere_release.hooks.backups import BackupError, BackupHook
from omnisphere_release.hooks.postgres import ServiceDatabaseHook, data_engine, schema_engine
from omnisphere_release.migrations import InvalidMigrationInput
from omnisphere_release.operators.common import (
    as_bool,
    as_optional_int,
    backup_bucket_of,
    hold_service,
    run_label,
    safe_key,
)
from omnisphere_release.operators.datamigrate import PostgresDataMigrateOperator
from omnisphere_release.operators.migrations import PostgresApplyMigrationsOperator

GUARD_FIELDS = ("window", "force_reason")
# What both standalone DAGs pass a guarded operator: their own window params (the environment is the run's param).
GUARD_TEMPLATES = {"window": "{{ params.window }}", "force_reason": "{{ params.force_reason or '' }}"}


def backup_key(service: str, dag_id: str, run_id: str) -> str:
    """Return the S3 key of a standalone run's backup of ``service``: beside a release's (``<service>/<run id>/``),
    named by the DAG that took it, and the same for every try of the run."""
    return f"{service}/{safe_key(run_id)}/{dag_id}.dump"


def production_window(service: Service, window: str, force_reason: str, now: datetime,
                      triggered_at: datetime | None = None) -> WindowDecision:
    """Return when a standalone change of ``service`` may run (checks.decide_window); refuse for good, naming the
    param at fault, when it may not.

    ``next`` is decided at ``now``: each service of ``all`` waits for its own next window when its wave starts. A
    fixed time (an ISO 8601 start, or ``now``) is decided as of ``triggered_at``, when the run was asked for: a later
    wave of that run goes on from it, rather than being refused because that time has passed by then; but a service
    whose window has closed meanwhile is refused.
    """
    window = window or "next"
    at = now if window == "next" or triggered_at is None else min(triggered_at, now)
    try:
        decision = decide_window(schedule_of(service), window, plain_text(force_reason), at,
                                 service.maintenance_window.max_days_ahead)
    except Refused as exc:
        raise AirflowFailException(f"Refused, nothing was changed: {exc}") from None
    end = decision.get("window_end")
    if end and datetime.fromisoformat(end) <= now:
        raise AirflowFailException(
            f"Refused, nothing was changed: the maintenance window of {service.name} that param window={window} "
            f"chose closed at {end}, before this change could start; trigger it again for its next window "
            f"({schedule_of(service).summary()}), or with a force_reason.")
    return decision


def check_backup_bucket(services: list[Service], environment: Environment) -> str:
    """Refuse for good when the environment's backup bucket is unset or out of reach of a service's AWS connection;
    return it."""
    bucket = backup_bucket_of(environment)
    if not bucket:
        raise AirflowFailException(
            f"Refused, nothing was changed: the Airflow Variable {environment.backup_bucket_variable} (the backup "
            f"bucket of {environment.name}) is not set, and in production a database is backed up before it changes. "
            f"Set it to the backup bucket (docs/runbook.md, Production).")
    for service in services:
        try:
            BackupHook.for_service(service).check_destination(bucket)
        except BackupError as exc:
            raise AirflowFailException(f"Refused, nothing was changed: {service.name}: {exc}") from None
    return bucket


class StandaloneGuard(BaseOperator):
    """Guard the change a service stage operator makes (mixed in before it): in production, a change needs a reason,
    waits deferred for the service's window (``window``: ``next``, an ISO 8601 start, or ``now`` with
    ``force_reason``), and is made only after the service's database was dumped to S3 and verified, with the lease
    held. The return value is the stage's, plus ``window`` and ``backup``.

    Subclasses say whether the run asks for a change at all (:meth:`_asks_for_change`), why it would change nothing
    (:meth:`_why_nothing_changes`), and what the operation is called in the lease (:meth:`_operation`).
    """

    service: str
    reason: Any

    environment: str

    def __init__(self, *, window: str = "next", force_reason: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window = window
        self.force_reason = force_reason

    # ---- what the stage says: each guarded operator below answers these three ---------------------------------
    def _asks_for_change(self) -> bool:
        raise NotImplementedError

    def _why_nothing_changes(self, context: Context, catalog: Catalog, service: Service) -> str | None:
        raise NotImplementedError

    def _operation(self, service: Service) -> str:
        raise NotImplementedError

    # ---- the guard ---------------------------------------------------------------------------------------------
    def execute(self, context: Context) -> Any:
        if not self._asks_for_change():
            return super().execute(context)
        catalog = load_catalog()
        environment = catalog.environment(self.environment)
        if not environment.production:
            self.log.info("Environment %s: no maintenance window and no backup before this change; they apply in "
                          "production environments (%s).", environment.name,
                          ", ".join(e.name for e in catalog.environments if e.production) or "none in the catalog")
            return super().execute(context)
        service = catalog.get(self.service, self.environment)
        if not plain_text(self.reason):
            raise AirflowFailException(f"Refused, nothing was changed: param 'reason' is required in production to "
                                       f"change {service.name}: say why (it is kept with the change).")
        # Refused now if another run holds the service, not at 2 a.m. when the window opens and nobody watches.
        hold_service(context, service, self._operation(service), self.log)
        idle = self._why_nothing_changes(context, catalog, service)
        if idle:
            self.log.info("%s: %s; no window to wait for and no backup to take.", service.name, idle)
            return super().execute(context)
        window = self._wait_for_window(context, service)  # after a deferral, execute runs again from the top
        backup = self._back_up(context, service)
        return {**super().execute(context), "window": window, "backup": backup}

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        """Decide again once the wait is over: the database or the files may have changed meanwhile."""
        self.log.info("The time %s waited for has come; checking again before changing it.", self.service)
        return self.execute(context)

    def _wait_for_window(self, context: Context, service: Service) -> WindowDecision:
        """Return the window decision if the change may run now; otherwise defer until it may."""
        now = datetime.now(timezone.utc)
        force_reason = plain_text(self.force_reason)
        decision = production_window(service, str(self.window or "next"), force_reason, now,
                                     context["dag_run"].run_after)
        schedule = schedule_of(service)
        start = datetime.fromisoformat(decision["window_start"])
        inside = bool(decision.get("window_end"))  # a forced decision has no window to close on it
        when = (f"in its maintenance window ({decision['window_start']} to {decision['window_end']}, "
                f"{schedule.summary()})" if inside else
                f"outside its maintenance window ({schedule.summary()}), because: {force_reason}")
        if start > now:
            # No execution_timeout runs while deferred: waiting days for a window holds no worker slot and no clock.
            self.log.info("Waiting (deferred, no worker slot held) until %s to change %s %s. The service stays held "
                          "by this run meanwhile.", decision["window_start"], service.name, when)
            self.defer(trigger=DateTimeTrigger(moment=start), method_name="execute_complete")
        self.log.info("%s may be changed now, %s.", service.name, when)
        return decision

    def _back_up(self, context: Context, service: Service) -> dict[str, Any]:
        """Dump the service database to S3, verified, and return where; on a retry, keep this run's first dump."""
        bucket = check_backup_bucket([service], load_catalog().environment(self.environment))
        key = backup_key(service.name, self.dag_id, context["run_id"])
        uri = f"s3://{bucket}/{key}"
        hook = BackupHook.for_service(service)
        kept = self._backup_of_an_earlier_try(hook, bucket, key)
        if kept:
            # An earlier try may have changed the database before it failed: a new dump would not be the state
            # before this run, so the first one (complete: it is tagged only once verified) is the way back.
            self.log.info("Keeping %s (sha256 %s...), the backup an earlier try of this run took before changing %s.",
                          uri, kept[:16], service.name)
            return {"bucket": bucket, "key": key, "uri": uri, "sha256": kept, "kept_from_earlier_try": True}
        self.log.info("Backing up %s (%s) to %s with pg_dump --format=custom before changing it ...", service.name,
                      ServiceDatabaseHook(service.postgres_conn_id).describe(), uri)
        try:
            record = hook.dump_to_s3(bucket, key)
        except BackupError as exc:
            raise AirflowException(f"Backup of {service.name} failed: {exc}. Nothing was changed (Airflow retries "
                                   f"this task if retries remain).") from None
        self.log.info("Backed up %s: %.1f MB, %d objects listed by pg_restore, sha256 %s..., dump %.1fs; encrypted at "
                      "rest. To undo this change: rollback_%s with restore_backup_uri=%s.", record.uri,
                      record.size_bytes / 1e6, record.objects, record.sha256[:16], record.dump_seconds, service.name,
                      record.uri)
        return record.to_dict()

    @staticmethod
    def _backup_of_an_earlier_try(hook: BackupHook, bucket: str, key: str) -> str | None:
        """Return the sha256 tag of this run's backup if an earlier try completed it, else None."""
        try:
            return hook.recorded_sha256(bucket, key)
        except (ClientError, BotoCoreError):  # no such object (or unreadable: the dump then says why)
            return None


class StandaloneApplyMigrationsOperator(StandaloneGuard, PostgresApplyMigrationsOperator):
    """``schema_migrations``' migrate task: PostgresApplyMigrationsOperator, guarded in production (see
    StandaloneGuard). A dry run is never guarded; neither is a service with no migration to apply or revert."""

    template_fields: Sequence[str] = (*PostgresApplyMigrationsOperator.template_fields, *GUARD_FIELDS)

    def _asks_for_change(self) -> bool:
        return not as_bool(self.plan_only)

    def _operation(self, service: Service) -> str:
        return f"schema migrations of {service.name} {self.direction}"

    def _why_nothing_changes(self, context: Context, catalog: Catalog, service: Service) -> str | None:
        engine = schema_engine(service, catalog, run_label(self.dag_id, context["run_id"]), self.log)
        try:  # the plan (logged with its SQL) without the lint: the change itself lints before it applies
            plan = engine.migrate(self.direction, as_optional_int(self.target_version), dry_run=True,
                                  acknowledge_drift=plain_text(self.acknowledge_drift) or None, run_lint=False).plan
        except InvalidMigrationInput as exc:
            raise AirflowFailException(f"Refused, nothing changed: {exc}") from None
        if plan.steps or plan.drift:  # acknowledging drift writes the history too
            return None
        return f"nothing to {self.direction}, the schema is at version {plan.current_version}"


class StandaloneDataMigrateOperator(StandaloneGuard, PostgresDataMigrateOperator):
    """``data_migrations``' task: PostgresDataMigrateOperator, guarded in production (see StandaloneGuard) for
    ``run`` and ``revert``; a ``pause`` is a request to the run that holds the service, not a change.

    Being the DAG's first task, it also refuses a run whose conf has keys the DAG does not know.
    """

    template_fields = (*PostgresDataMigrateOperator.template_fields, *GUARD_FIELDS)

    def execute(self, context: Context) -> Any:
        problem = unknown_conf_problem(context["dag_run"].conf, self.dag.params.keys())
        if problem:
            raise AirflowFailException(problem)
        return super().execute(context)

    def _asks_for_change(self) -> bool:
        return self.action != "pause"

    def _operation(self, service: Service) -> str:
        return self.operation(service)

    def _why_nothing_changes(self, context: Context, catalog: Catalog, service: Service) -> str | None:
        specs = self.specs(catalog, service)
        if self.action == "revert":
            if any(spec.reversible for spec in specs):
                return None
            return "no reversible data migration to revert (the task refuses it)"
        run_by = run_label(self.dag_id, context["run_id"])
        states = {spec.name: getattr(data_engine(service, spec, run_by, self.log).status(), "state", None)
                  for spec in specs}
        if any(state != "done" for state in states.values()):
            return None
        return f"{', '.join(states) or 'no data migration'} done already"
