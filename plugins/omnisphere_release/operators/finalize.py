"""finalize and verify_rollback: how a release ends, either way: the deployment done, or the way back verified."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from omnisphere_release.catalog import Catalog, Service, load_catalog
from omnisphere_release.checks import ObservedState, truth_problems
from omnisphere_release.contracts import ROLLBACK_ECS, ReleaseRun
from omnisphere_release.hooks.ecs import RUN_TAG, EcsDeploymentError, EcsDeploymentHook
from omnisphere_release.hooks.http import SmokeTestHook
from omnisphere_release.hooks.postgres import schema_engine
from omnisphere_release.logs import Log
from omnisphere_release.migrations import discover
from omnisphere_release.operators.common import ServiceStageOperator


def observe(service: Service, catalog: Catalog, log: Log) -> tuple[ObservedState, list[int]]:
    """Read what the service runs now and its schema, with who did it; return it and the migration files' versions."""
    live = EcsDeploymentHook(service.aws_conn_id).live_revision(service.ecs.cluster, service.ecs.service,
                                                                service.ecs.container)
    registered_by = next((t["value"] for t in live.task_definition.get("tags", []) if t["key"] == RUN_TAG), None)
    engine = schema_engine(service, catalog, "verify", log)
    status = engine.status()
    file_versions = [m.version for m in discover(catalog.migrations_dir(service.name))]
    applied = tuple(a.version for a in status.applied)
    observed = ObservedState(
        task_definition=live.arn, registered_by=registered_by, schema_version=status.current_version,
        applied_versions=applied, applied_by={a.version: a.applied_by for a in status.applied},
        last_actions=engine.last_actions([v for v in file_versions if v not in applied]),
        drifted=tuple(status.drifted), dirty=tuple(d.version for d in status.dirty))
    return observed, file_versions


class ReleaseFinalizeOperator(ServiceStageOperator):
    """finalize: wait for ECS to finish the deployment (blue/green clean-up) and mark the release done."""

    def execute(self, context: Context) -> dict[str, Any]:
        service = load_catalog().get(self.service)
        run = ReleaseRun(context)
        arn = run.deployment["deployment_arn"]
        self.log.info("Finalizing the release of %s: waiting for ECS to finish deployment %s (clean-up of the old "
                      "revision).", service.name, arn)
        try:
            settled = EcsDeploymentHook(service.aws_conn_id).wait_until_settled(
                arn, service.deploy.timeout_minutes * 60, 2.0)
        except EcsDeploymentError as exc:
            raise AirflowException(f"Finalize of {service.name}: {exc}") from None
        if settled["status"] != "SUCCESSFUL":
            raise AirflowFailException(f"The deployment ended {settled['status']} after the gate passed: "
                                       f"{settled.get('statusReason')}. Next: the release rolls back.")
        plan = run.plan
        assert plan is not None, "finalize runs only after preflight succeeded"
        # Green means true: what runs now is what this run deployed and migrated, whatever else happened meanwhile.
        catalog = load_catalog()
        observed, file_versions = observe(service, catalog, self.log)
        problems = truth_problems(service.name, observed, task_definition=run.deployment["task_definition"],
                                  schema_version=plan["target_version"], file_versions=file_versions)
        if problems:
            raise AirflowFailException("The release is not what runs now, so it is not released:\n"
                                       + "\n".join(f"  - {p}" for p in problems)
                                       + "\nNext: the release rolls back to the state before it.")
        self.log.info("Release of %s done and verified: %s runs %s (%s), schema at version %s with migrations %s "
                      "as in the files.", service.name, service.ecs.service, plan["target_image"],
                      observed.task_definition, observed.schema_version, list(observed.applied_versions))
        return {"deployment_status": settled["status"], "task_definition": observed.task_definition,
                "schema_version": observed.schema_version}


class VerifyRollbackOperator(ServiceStageOperator):
    """verify_rollback: the service is on its previous task definition, the schema at its previous version, and the
    smoke tests pass on the old version. Skipped when nothing failed."""

    ui_color = "#f8e0d8"

    def execute(self, context: Context) -> dict[str, Any]:
        run = ReleaseRun(context)
        if run.task_states().get(ROLLBACK_ECS) in ("skipped", "none", "upstream_failed"):
            raise AirflowSkipException("Nothing to verify: the rollback branch did not run.")
        plan = run.plan
        if not plan:
            raise AirflowSkipException("Nothing to verify: preflight refused the release, nothing was changed.")
        catalog = load_catalog()
        service = catalog.get(self.service)
        self.log.info("Verifying that %s is back to its state before the release: task definition %s, schema version "
                      "%s, smoke tests on the old version.", service.name, plan["previous_task_definition"],
                      plan["schema_version"])
        observed, file_versions = observe(service, catalog, self.log)
        problems = truth_problems(service.name, observed, task_definition=plan["previous_task_definition"],
                                  schema_version=plan["schema_version"], file_versions=file_versions)
        version = observed.schema_version
        results = SmokeTestHook(service.http_conn_id).probe_until_deadline(
            service.smoke_tests, service.smoke_deadline_seconds, service.name)
        problems += [f"smoke: {r.describe()}" for r in results if not r.ok]
        if problems:
            raise AirflowFailException(f"{service.name} is NOT back to its state before the release: "
                                       + "; ".join(problems) + ". Page the service owner with the report.")
        self.log.info("Rollback of %s verified: %s, schema version %d, smoke tests pass.", service.name,
                      plan["previous_task_definition"], version)
        return {"task_definition": observed.task_definition, "schema_version": version}
