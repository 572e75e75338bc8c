"""Run the schema migration engine from Airflow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import load_catalog
from omnisphere_release.hooks.postgres import ServiceDatabaseHook
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
        target = None if self.target_version in (None, "", "None") else int(self.target_version)
        dry_run = self.dry_run if isinstance(self.dry_run, bool) else str(self.dry_run).lower() == "true"
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
