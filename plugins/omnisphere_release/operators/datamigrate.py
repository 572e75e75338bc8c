"""data_migrate: run a service's data migrations (all pending ones, or one by name) with the batched engine."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import Catalog, Service, load_catalog
from omnisphere_release.checks import plain_text
from omnisphere_release.contracts import DataMigrationOutcome
from omnisphere_release.datamigrate import DataMigrationSpec, discover_specs, load_functions
from omnisphere_release.hooks.postgres import data_engine
from omnisphere_release.migrations.errors import InvalidMigrationInput, LockBusy, MigrationFailed
from omnisphere_release.operators.common import ServiceStageOperator, hold_service, run_label


class PostgresDataMigrateOperator(ServiceStageOperator):
    """Run data migrations of include/sql/<service>/data/ in name order; each resumes from its checkpoint.

    An Airflow retry resumes where the failed try stopped: committed batches are never run again. ``action`` is
    ``run``, ``revert`` or ``pause`` (a pause request; the running migration stops after its current batch).
    ``reason``, when given, is logged and kept as part of ``run_by`` in the checkpoint the run creates.
    """

    template_fields: tuple[str, ...] = ("service", "environment", "migration", "action", "reason")

    def __init__(self, *, service: str, migration: str | None = None, action: str = "run", reason: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        self.migration = migration
        self.action = action
        self.reason = reason

    @property
    def wanted(self) -> str | None:
        """The one data migration asked for, or None for all of them."""
        return None if self.migration in (None, "", "None", "all") else self.migration

    def operation(self, service: Service) -> str:
        """Say what this task does to ``service``, as its lease records it."""
        return f"data migration {self.wanted or 'all'} of {service.name} ({self.action})"

    def specs(self, catalog: Catalog, service: Service) -> list[DataMigrationSpec]:
        """Return the specs this task runs, in name order; refuse for good a broken spec or an unknown name."""
        try:
            specs = discover_specs(catalog.sql_dir / service.name / "data")
        except InvalidMigrationInput as exc:
            raise AirflowFailException(str(exc)) from None
        if self.wanted:
            specs = [s for s in specs if s.name == self.wanted]
            if not specs:
                raise AirflowFailException(f"{service.name} has no data migration {self.wanted!r} in "
                                           f"{catalog.sql_dir / service.name / 'data'}")
        if self.action != "pause":
            # Every spec's Python functions (both directions) import and take (conn, last_key, upper_key) before the
            # first batch of the first spec: a broken second spec must not leave the first one run and the task failed.
            try:
                for spec in specs:
                    load_functions(spec)
            except InvalidMigrationInput as exc:
                raise AirflowFailException(f"Refused: {exc}") from None
        return specs

    def execute(self, context: Context) -> dict[str, list[DataMigrationOutcome]]:
        catalog = load_catalog()
        service = catalog.get(self.service, self.environment)
        specs = self.specs(catalog, service)
        if self.action != "pause":  # a pause is a request to the run that holds the service, not a new operation
            hold_service(context, service, self.operation(service), self.log)
        reason = plain_text(self.reason)
        if reason:
            self.log.info("Data migration %s of %s (%s) because: %s", self.wanted or "all", service.name,
                          self.action, reason)
        run_by = run_label(self.dag_id, context["run_id"]) + (f" ({reason})" if reason else "")
        results: list[DataMigrationOutcome] = []
        for spec in specs:
            engine = data_engine(service, spec, run_by=run_by, log=self.log)
            if self.action == "pause":
                engine.request_pause()
                self.log.info("Pause requested for %s: it stops after its current batch.", spec.name)
                continue
            try:
                result = engine.run("forward" if self.action == "run" else "revert")
            except InvalidMigrationInput as exc:
                raise AirflowFailException(f"Refused: {exc}") from None
            except LockBusy as exc:
                raise AirflowException(str(exc)) from None
            except MigrationFailed as exc:
                # Committed batches stay: a retry of this task resumes from the checkpoint.
                raise AirflowException(str(exc)) from None
            results.append({"name": result.name, "direction": result.direction, "state": result.state,
                            "rows": result.rows, "batches": result.batches, "seconds": round(result.seconds, 2),
                            "reversible": spec.reversible})
        self.log.info("Data migrations of %s: %s", service.name,
                      "; ".join(f"{r['name']} {r['state']} ({r['rows']} rows)" for r in results) or "none to run")
        return {"migrations": results}
