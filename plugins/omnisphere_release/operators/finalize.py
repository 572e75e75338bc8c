"""finalize and verify_rollback: how a release ends, either way: the deployment done, or the way back verified."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from omnisphere_release.catalog import load_catalog
from omnisphere_release.contracts import ROLLBACK_ECS, ReleaseRun
from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsDeploymentHook
from omnisphere_release.hooks.http import SmokeTestHook
from omnisphere_release.hooks.postgres import schema_engine
from omnisphere_release.operators.common import ServiceStageOperator


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
        self.log.info("Release of %s done: %s runs %s, schema at version %s.", service.name, service.ecs.service,
                      plan["target_image"], plan["target_version"])
        return {"deployment_status": settled["status"]}


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
        problems = []
        live = EcsDeploymentHook(service.aws_conn_id).describe_service(service.ecs.cluster, service.ecs.service)
        if live["taskDefinition"] != plan["previous_task_definition"]:
            problems.append(f"service runs {live['taskDefinition']}, not the previous "
                            f"{plan['previous_task_definition']}")
        version = schema_engine(service, catalog, "verify", self.log).status().current_version
        if version != plan["schema_version"]:
            problems.append(f"schema is at version {version}, not the previous {plan['schema_version']}")
        results = SmokeTestHook(service.http_conn_id).probe_until_deadline(
            service.smoke_tests, service.smoke_deadline_seconds, service.name)
        problems += [f"smoke: {r.describe()}" for r in results if not r.ok]
        if problems:
            raise AirflowFailException(f"{service.name} is NOT back to its state before the release: "
                                       + "; ".join(problems) + ". Page the service owner with the report.")
        self.log.info("Rollback of %s verified: %s, schema version %d, smoke tests pass.", service.name,
                      plan["previous_task_definition"], version)
        return {"task_definition": live["taskDefinition"], "schema_version": version}
