"""schema_up and rollback_schema: apply a service's schema migrations, and revert exactly what a release applied."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import Catalog, Service, load_catalog
from omnisphere_release.checks import plain_text
from omnisphere_release.contracts import ReleaseRun
from omnisphere_release.datamigrate import discover_specs
from omnisphere_release.hooks.postgres import ServiceDatabaseHook, data_engine, schema_engine
from omnisphere_release.logs import Log
from omnisphere_release.migrations import InvalidMigrationInput, MigrationFailed, RunResult, Status
from omnisphere_release.operators.common import (
    ServiceStageOperator,
    as_bool,
    as_optional_int,
    hold_service,
    run_label,
)
from omnisphere_release.transient import DatabaseUnreachable, retry_lost_connection


def revert_schema_to(service: Service, catalog: Catalog, version: int, *, applied_by: str, reason: str, log: Log,
                     next_on_failure: str) -> dict[str, Any]:
    """Revert ``service``'s schema down to ``version``: the one schema-revert path of the release's rollback_schema
    and of rollback_<service>. At ``version`` already, it does nothing, so running it twice changes nothing.

    Below ``version`` is refused: someone else moved the schema, and guessing would make it worse. A failed down
    file fails the task for good, with ``next_on_failure`` saying what happens then. A lost connection is retried
    within a bounded budget: each down file commits with its history row, so the rerun goes on where it stopped.
    """
    engine = schema_engine(service, catalog, applied_by, log)

    def revert() -> dict[str, Any] | RunResult:
        current = engine.status().current_version
        if current == version:
            log.info("Nothing to revert: %s is at version %d already.", service.name, current)
            return {"reverted": [], "schema_version": current}
        if current < version:
            raise AirflowFailException(f"{service.name} is at version {current}, below the target {version}: "
                                       f"someone else changed it; not touching it.")
        log.info("Reverting %s from version %d to %d, in reverse order.", service.name, current, version)
        return engine.migrate("down", version, reason=reason)

    try:
        result = retry_lost_connection(revert, f"schema rollback of {service.name}", log)
    except DatabaseUnreachable as exc:
        raise AirflowException(f"{exc}. Retrying if retries remain; what was reverted stays reverted.") from None
    except (InvalidMigrationInput, MigrationFailed) as exc:
        raise AirflowFailException(f"Schema rollback of {service.name} failed: {exc}. {next_on_failure}") from None
    if isinstance(result, dict):
        return result
    log.info("Reverted %s to version %d (%s) in %.1fs.", service.name, result.to_version,
             ", ".join(str(v) for v in result.versions), result.seconds)
    return {"reverted": result.versions, "schema_version": result.to_version}


class PostgresApplyMigrationsOperator(BaseOperator):
    """Apply (``up``) or revert (``down``) a service's schema migrations to a target version.

    Pushes the run's outcome (versions applied or reverted, from and to) as its return value, which the release's
    rollback reads to undo exactly what this run did.
    """

    template_fields: Sequence[str] = ("service", "environment", "direction", "target_version", "plan_only", "reason",
                                      "acknowledge_drift")
    ui_color = "#d8e8f8"

    def __init__(self, *, service: str, direction: str = "up", target_version: Any = None, dry_run: Any = False,
                 reason: str | None = None, acknowledge_drift: str | None = None,
                 environment: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.environment = environment
        self.direction = direction
        self.target_version = target_version
        self.plan_only = dry_run  # not self.dry_run: that is BaseOperator's own method
        self.reason = reason
        self.acknowledge_drift = acknowledge_drift

    def execute(self, context: Context) -> dict[str, Any]:
        catalog = load_catalog()
        service = catalog.get(self.service, self.environment)
        target = as_optional_int(self.target_version)
        dry_run = as_bool(self.plan_only)
        # who applied each version: rollback_schema reverts only what its own run applied
        engine = schema_engine(service, catalog, run_label(self.dag_id, context["run_id"]), self.log)
        self.log.info("Migrating %s %s to %s%s (database %s)", service.name, self.direction,
                      "the latest version" if target is None and self.direction == "up" else
                      ("one version down" if target is None else f"version {target}"),
                      " as a dry run: nothing will change" if dry_run else "",
                      ServiceDatabaseHook(service.postgres_conn_id).describe())

        before: list[Status] = []  # the schema before this task's first attempt, to report every attempt's work

        def migrate() -> RunResult:
            if not dry_run:
                hold_service(context, service, f"schema migrations of {service.name} {self.direction}", self.log)
                if not before:
                    before.append(engine.status())
            return engine.migrate(self.direction, target, dry_run=dry_run, reason=plain_text(self.reason) or None,
                                  acknowledge_drift=plain_text(self.acknowledge_drift) or None)

        try:
            # A database that restarts drops the connection; each migration commits with its history row, so the
            # rerun plans again from what committed and goes on (a migration run outside a transaction is left
            # dirty, and the rerun refuses it until a person resolves it).
            result = retry_lost_connection(migrate, f"schema migrations of {service.name} {self.direction}",
                                           self.log)
        except DatabaseUnreachable as exc:
            raise AirflowException(f"{exc}. Migrations that committed stay; a rerun goes on from there.") from None
        except InvalidMigrationInput as exc:
            raise AirflowFailException(f"Refused, nothing changed: {exc}") from None
        except MigrationFailed as exc:
            if exc.retryable:
                raise AirflowException(f"{exc} (Airflow retries this task if retries remain)") from None
            raise AirflowFailException(str(exc)) from None
        if dry_run:
            self.log.info("Dry run of %s: %d step(s) planned; set dry_run=false to apply them.", service.name,
                          len(result.plan.steps))
        from_version, versions = result.from_version, result.versions
        if before and before[0].current_version != result.from_version:
            # An attempt cut short by a lost connection committed some migrations first: they are this task's too.
            was, now = {a.version for a in before[0].applied}, {a.version for a in engine.status().applied}
            versions = sorted(now - was) if result.direction == "up" else sorted(was - now, reverse=True)
            from_version = before[0].current_version
            self.log.info("%s: this task moved the schema from version %s to %s in all (%s), over more than one "
                          "connection.", service.name, from_version, result.to_version, versions)
        return {
            "service": service.name,
            "direction": result.direction,
            "dry_run": result.dry_run,
            "from_version": from_version,
            "to_version": result.to_version,
            "planned_versions": [m.version for m in result.plan.steps],
            "versions": versions,
            "seconds": round(result.seconds, 3),
        }


class PostgresRevertReleaseMigrationsOperator(ServiceStageOperator):
    """rollback_schema: revert what this release applied, down to the version preflight recorded.

    It reads the database rather than schema_up's output, because a schema_up that failed on its 2nd file still
    applied the 1st. Data migrations this run ran are reverted first, newest first. A failure here (a down file
    fails, an irreversible migration) fails the task, which sends the release to restore_backup.
    """

    ui_color = "#f8e0d8"

    def execute(self, context: Context) -> dict[str, Any]:
        run = ReleaseRun(context)
        plan = run.plan
        if not plan:
            self.log.info("Nothing to revert: preflight recorded no state, so this run changed no schema.")
            return {"reverted": [], "schema_version": None}
        catalog = load_catalog()
        service = catalog.get(self.service, self.environment)
        data_reverted = self._revert_data_migrations(service, catalog, run, context["run_id"])
        # Only what this run applied is undone: versions above the plan's that others applied (while a release
        # waited for its approver, the service was free) are not this run's to revert.
        this_run = run_label(self.dag_id, context["run_id"])
        status = schema_engine(service, catalog, this_run, self.log).status()
        above = [h for h in [*status.applied, *status.dirty] if h.version > plan["schema_version"]]
        if above and not any(h.applied_by == this_run for h in above):
            self.log.info("Nothing to revert: %s is at version %s, and the versions above %s were applied by others "
                          "(%s), not by this run. Next: restore_backup only if the policy says always.", service.name,
                          status.current_version, plan["schema_version"],
                          ", ".join(f"{h.version} by {h.applied_by}" for h in above))
            return {"reverted": [], "schema_version": status.current_version, "data_reverted": data_reverted,
                    "applied_by_others": [h.version for h in above]}
        result = revert_schema_to(service, catalog, plan["schema_version"],
                                  applied_by=f"{this_run} rollback",
                                  reason=f"rollback of {context['run_id']}", log=self.log,
                                  next_on_failure="Next: restore_backup restores the database from this run's backup.")
        self.log.info("%s is at version %d, as before the release. Next: restore_backup only if the policy says "
                      "always.", service.name, result["schema_version"])
        return {**result, "data_reverted": data_reverted}

    def _revert_data_migrations(self, service: Service, catalog: Catalog, run: ReleaseRun, run_id: str) -> list[str]:
        """Revert the data migrations this run ran, newest first; an irreversible one sends the release to restore."""
        ran = [m for m in run.data_migrations if m["state"] == "done"]
        if not ran:
            return []
        specs = {s.name: s for s in discover_specs(catalog.sql_dir / service.name / "data")}
        reverted = []
        for entry in reversed(ran):
            spec = specs[entry["name"]]
            if not spec.reversible:
                raise AirflowFailException(f"Data migration {spec.name} ran in this release and is irreversible; "
                                           f"only the backup can undo it. Next: restore_backup.")
            data_engine(service, spec, run_by=f"rollback {run_id}", log=self.log).run("revert")
            reverted.append(spec.name)
        return reverted
