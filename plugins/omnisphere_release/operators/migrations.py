"""Run the schema migration engine from Airflow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import load_catalog
from omnisphere_release.hooks.postgres import ServiceDatabaseHook
from omnisphere_release.operators.common import as_bool, as_optional_int
from omnisphere_release.migrations import EngineSettings, InvalidMigrationInput, MigrationEngine, MigrationFailed


class PostgresApplyMigrationsOperator(BaseOperator):
    """Apply (``up``) or revert (``down``) a service's schema migrations to a target version.

    Pushes the run's outcome (versions applied or reverted, from and to) as its return value, which the release's
    rollback reads to undo exactly what this run did.
    """

    template_fields: Sequence[str] = ("service", "direction", "target_version", "dry_run", "reason",
                                      "acknowledge_drift")
    ui_color = "#d8e8f8"

    def __init__(self, *, service: str, direction: str = "up", target_version: Any = None, dry_run: Any = False,
                 reason: str | None = None, acknowledge_drift: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.direction = direction
        self.target_version = target_version
        self.dry_run = dry_run
        self.reason = reason
        self.acknowledge_drift = acknowledge_drift

    def execute(self, context: Any) -> dict[str, Any]:
        catalog = load_catalog()
        service = catalog.get(self.service)
        target = as_optional_int(self.target_version)
        dry_run = as_bool(self.dry_run)
        run_id = context["run_id"]
        database = ServiceDatabaseHook(service.postgres_conn_id)
        engine = MigrationEngine(
            service=service.name,
            migrations_dir=catalog.migrations_dir(service.name),
            connect=database.get_conn,
            settings=EngineSettings.from_catalog(service.migrations),
            applied_by=f"dag={self.dag_id} run={run_id}",
            log=self.log,
        )
        self.log.info("Migrating %s %s to %s%s (database %s)", service.name, self.direction,
                      "the latest version" if target is None and self.direction == "up" else
                      ("one version down" if target is None else f"version {target}"),
                      " as a dry run: nothing will change" if dry_run else "", database.describe())
        try:
            result = engine.migrate(self.direction, target, dry_run=dry_run, reason=self.reason or None,
                                    acknowledge_drift=self.acknowledge_drift or None)
        except InvalidMigrationInput as exc:
            raise AirflowFailException(f"Refused, nothing changed: {exc}") from None
        except MigrationFailed as exc:
            if exc.retryable:
                raise AirflowException(f"{exc} (Airflow retries this task if retries remain)") from None
            raise AirflowFailException(str(exc)) from None
        if dry_run:
            self.log.info("Dry run of %s: %d step(s) planned; set dry_run=false to apply them.", service.name,
                          len(result.plan.steps))
        return {
            "service": service.name,
            "direction": result.direction,
            "dry_run": result.dry_run,
            "from_version": result.from_version,
            "to_version": result.to_version,
            "planned_versions": [m.version for m in result.plan.steps],
            "versions": result.versions,
            "seconds": round(result.seconds, 3),
        }


class PostgresRevertReleaseMigrationsOperator(BaseOperator):
    """rollback_schema: revert what this release applied, down to the version preflight recorded.

    It reads the database rather than schema_up's output, because a schema_up that failed on its 2nd file still
    applied the 1st. Idempotent: at the recorded version already, it does nothing. A failure here (a down file fails,
    an irreversible migration) fails the task, which sends the release to restore_backup.
    """

    template_fields: Sequence[str] = ("service",)
    ui_color = "#f8e0d8"

    def __init__(self, *, service: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service

    def execute(self, context: Any) -> dict[str, Any]:
        from omnisphere_release.operators.common import PREFLIGHT, stage_output
        from omnisphere_release.operators.preflight import migration_engine

        before = stage_output(context, PREFLIGHT)
        if not before:
            self.log.info("Nothing to revert: preflight recorded no state, so this run changed no schema.")
            return {"reverted": [], "schema_version": None}
        catalog = load_catalog()
        service = catalog.get(self.service)
        data_reverted = self._revert_data_migrations(service, catalog, context)
        engine = migration_engine(service, catalog, f"dag={self.dag_id} run={context['run_id']} rollback", self.log)
        current = engine.status().current_version
        target = before["schema_version"]
        if current == target:
            self.log.info("Nothing to revert: %s is at version %d, as before the release.", service.name, current)
            return {"reverted": [], "schema_version": current, "data_reverted": data_reverted}
        if current < target:
            raise AirflowFailException(f"{service.name} is at version {current}, below the {target} recorded before "
                                       f"the release: someone else changed it; not touching it.")
        self.log.info("Reverting %s from version %d to %d (what this release applied), in reverse order.",
                      service.name, current, target)
        try:
            result = engine.migrate("down", target, reason=f"rollback of {context['run_id']}")
        except (InvalidMigrationInput, MigrationFailed) as exc:
            raise AirflowFailException(f"Schema rollback of {service.name} failed: {exc}. Next: restore_backup "
                                       f"restores the database from this run's backup.") from None
        self.log.info("Reverted %s to version %d (%s) in %.1fs. Next: restore_backup only if the policy says always.",
                      service.name, result.to_version, ", ".join(str(v) for v in result.versions), result.seconds)
        return {"reverted": result.versions, "schema_version": result.to_version, "data_reverted": data_reverted}

    def _revert_data_migrations(self, service: Any, catalog: Any, context: Any) -> list[str]:
        """Revert the data migrations this run ran, newest first; an irreversible one sends the release to restore."""
        from omnisphere_release.datamigrate import DataMigrationEngine, discover_specs
        from omnisphere_release.hooks.postgres import ServiceDatabaseHook
        from omnisphere_release.operators.common import DATA_MIGRATE, stage_output

        ran = [m for m in (stage_output(context, DATA_MIGRATE) or {}).get("migrations", []) if m["state"] == "done"]
        if not ran:
            return []
        specs = {s.name: s for s in discover_specs(catalog.sql_dir / service.name / "data")}
        reverted = []
        for entry in reversed(ran):
            spec = specs[entry["name"]]
            if not spec.reversible:
                raise AirflowFailException(f"Data migration {spec.name} ran in this release and is irreversible; "
                                           f"only the backup can undo it. Next: restore_backup.")
            DataMigrationEngine(spec, ServiceDatabaseHook(service.postgres_conn_id).get_conn,
                                run_by=f"rollback {context['run_id']}", log=self.log).run("revert")
            reverted.append(spec.name)
        return reverted
