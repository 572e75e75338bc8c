"""finalize and verify_rollback: how a release ends, either way: the deployment done, or the way back verified."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from omnisphere_release.catalog import Catalog, Service, load_catalog
from omnisphere_release.checks import ObservedState, truth_problems
from omnisphere_release.contracts import ROLLBACK_ECS, ROLLBACK_SCHEMA, ReleaseRun
from omnisphere_release.hooks.ecs import IN_FLIGHT, RUN_TAG, EcsDeploymentError, EcsDeploymentHook, summarize
from omnisphere_release.hooks.http import SmokeTestHook
from omnisphere_release.hooks.postgres import schema_engine
from omnisphere_release.logs import Log
from omnisphere_release.migrations import discover
from omnisphere_release.operators.common import ServiceStageOperator
from omnisphere_release.operators.ecs import run_tag_of
from omnisphere_release.triggers.ecs import EcsServiceDeploymentTrigger


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
    """finalize: wait, deferred, for ECS to finish the deployment (blue/green clean-up), then check that what runs is
    what this run released, and mark the release done."""

    def __init__(self, *, service: str, poll_seconds: float = 3.0, **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        self.poll_seconds = poll_seconds

    def execute(self, context: Context) -> dict[str, Any]:
        service = load_catalog().get(self.service, self.environment)
        arn = ReleaseRun(context).deployment["deployment_arn"]
        try:
            deployment = EcsDeploymentHook(service.aws_conn_id).describe_deployment(arn)
        except EcsDeploymentError as exc:
            raise AirflowException(f"Finalize of {service.name}: {exc}. Retrying if retries remain.") from None
        if deployment["status"] in IN_FLIGHT:
            timeout = service.deploy.timeout_minutes * 60
            self.log.info("Finalizing the release of %s: waiting, deferred, up to %d min for ECS to finish deployment "
                          "%s (%s).", service.name, service.deploy.timeout_minutes, arn, summarize(deployment))
            self.defer(
                trigger=EcsServiceDeploymentTrigger(deployment_arn=arn, deadline=time.time() + timeout,
                                                    aws_conn_id=service.aws_conn_id, poll_seconds=self.poll_seconds,
                                                    settle=True),
                method_name="execute_complete",
                timeout=timedelta(seconds=timeout + 300),
            )
        return self._finish(context, deployment["status"], deployment.get("statusReason"))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        status = event.get("status")
        if status == "settled":
            self.log.info("Deployment %s settled: %s", event.get("deployment_arn"), event.get("summary"))
            return self._finish(context, str(event.get("deployment_status")), event.get("reason"))
        if status == "timeout":
            raise AirflowFailException(f"ECS deployment {event.get('deployment_arn')} did not finish within the "
                                       f"catalog's deploy.timeout_minutes after the gate passed; last state: "
                                       f"{event.get('summary')}. Next: the release rolls back.")
        raise AirflowException(f"Finalize of {self.service}: could not follow ECS deployment "
                               f"{event.get('deployment_arn')}: {event.get('message')}. Retrying if retries remain "
                               f"(a retry looks at the same deployment again).")

    def _finish(self, context: Context, deployment_status: str, reason: Any) -> dict[str, Any]:
        """Check how the deployment ended and that what runs is what this run released; return the release's end."""
        if deployment_status != "SUCCESSFUL":
            raise AirflowFailException(f"The deployment ended {deployment_status} after the gate passed: "
                                       f"{reason}. Next: the release rolls back.")
        run = ReleaseRun(context)
        catalog = load_catalog()
        service = catalog.get(self.service, self.environment)
        plan = run.plan
        assert plan is not None, "finalize runs only after preflight succeeded"
        # Green means true: what runs now is what this run deployed and migrated, whatever else happened meanwhile.
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
        return {"deployment_status": deployment_status, "task_definition": observed.task_definition,
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
        service = catalog.get(self.service, self.environment)
        self.log.info("Verifying that %s is back to its state before the release: task definition %s, schema version "
                      "%s, smoke tests on the old version.", service.name, plan["previous_task_definition"],
                      plan["schema_version"])
        observed, file_versions = observe(service, catalog, self.log)
        # What this run neither deployed nor applied is not its to put back (a hotfix that went first while the run
        # waited for its approver): the rollback steps said so, and then the check is that nothing of this run remains.
        task_definition, schema_version = plan["previous_task_definition"], plan["schema_version"]
        if (run.output(ROLLBACK_ECS) or {}).get("deployed") is False and \
                observed.registered_by != run_tag_of(self.dag_id, context["run_id"]):
            task_definition = observed.task_definition
        schema_back = run.output(ROLLBACK_SCHEMA) or {}
        if schema_back.get("applied_by_others"):
            schema_version = schema_back["schema_version"]
        problems = truth_problems(service.name, observed, task_definition=task_definition,
                                  schema_version=schema_version, file_versions=file_versions)
        version = observed.schema_version
        results = SmokeTestHook(service.http_conn_id).probe_until_deadline(
            service.smoke_tests, service.smoke_deadline_seconds, service.name)
        problems += [f"smoke: {r.describe()}" for r in results if not r.ok]
        if problems:
            raise AirflowFailException(f"{service.name} is NOT back to its state before the release: "
                                       + "; ".join(problems) + ". Page the service owner with the report.")
        self.log.info("Rollback of %s verified: %s, schema version %d, smoke tests pass.", service.name,
                      task_definition, version)
        return {"task_definition": observed.task_definition, "schema_version": version}
