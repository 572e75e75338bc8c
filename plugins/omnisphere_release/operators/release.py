"""finalize, verify_rollback, release_failed and report: how a release ends."""

from __future__ import annotations

import json
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from omnisphere_release.catalog import load_catalog
from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsDeploymentHook, image_of
from omnisphere_release.operators.common import (BACKUP, ECS_DEPLOY, FINALIZE, MAIN_STAGES, PREFLIGHT, RELEASE_FAILED,
                                                 REPORT, ROLLBACK_ECS, ROLLBACK_STAGES, ServiceStageOperator,
                                                 failed_stages, run_task_states, safe_key, stage_output)
from omnisphere_release.operators.preflight import migration_engine
from omnisphere_release.operators.smoke import smoke_until_deadline
from omnisphere_release.report import build_report, render_markdown


class ReleaseFinalizeOperator(ServiceStageOperator):
    """finalize: wait for ECS to finish the deployment (blue/green clean-up) and mark the release done."""

    def execute(self, context: Any) -> dict[str, Any]:
        service = load_catalog().get(self.service)
        deployment = stage_output(context, ECS_DEPLOY) or {}
        self.log.info("Finalizing the release of %s: waiting for ECS to finish deployment %s (clean-up of the old "
                      "revision).", service.name, deployment.get("deployment_arn"))
        ecs = EcsDeploymentHook(service.aws_conn_id)
        try:
            settled = ecs.wait_until_settled(deployment["deployment_arn"], service.deploy.timeout_minutes * 60, 2.0)
        except EcsDeploymentError as exc:
            raise AirflowException(f"Finalize of {service.name}: {exc}") from None
        if settled["status"] != "SUCCESSFUL":
            raise AirflowFailException(f"The deployment ended {settled['status']} after the gate passed: "
                                       f"{settled.get('statusReason')}. Next: the release rolls back.")
        before = stage_output(context, PREFLIGHT)
        self.log.info("Release of %s done: %s runs %s, schema at version %s.", service.name, service.ecs.service,
                      before["target_image"], before["target_version"])
        return {"deployment_status": settled["status"]}


class VerifyRollbackOperator(ServiceStageOperator):
    """verify_rollback: the service is on its previous task definition, the schema at its previous version, and the
    smoke tests pass on the old version. Skipped when nothing failed."""

    ui_color = "#f8e0d8"

    def execute(self, context: Any) -> dict[str, Any]:
        states = run_task_states(context)
        if states.get(ROLLBACK_ECS) in ("skipped", "none", "upstream_failed"):
            raise AirflowSkipException("Nothing to verify: the rollback branch did not run.")
        before = stage_output(context, PREFLIGHT)
        if not before:
            raise AirflowSkipException("Nothing to verify: preflight refused the release, nothing was changed.")
        catalog = load_catalog()
        service = catalog.get(self.service)
        self.log.info("Verifying that %s is back to its state before the release: task definition %s, schema version "
                      "%s, smoke tests on the old version.", service.name, before["previous_task_definition"],
                      before["schema_version"])
        problems = []
        live = EcsDeploymentHook(service.aws_conn_id).describe_service(service.ecs.cluster, service.ecs.service)
        if live["taskDefinition"] != before["previous_task_definition"]:
            problems.append(f"service runs {live['taskDefinition']}, not the previous "
                            f"{before['previous_task_definition']}")
        version = migration_engine(service, catalog, "verify", self.log).status().current_version
        if version != before["schema_version"]:
            problems.append(f"schema is at version {version}, not the previous {before['schema_version']}")
        results = smoke_until_deadline(service, self.log)
        problems += [f"smoke: {r.describe()}" for r in results if not r.ok]
        if problems:
            raise AirflowFailException(f"{service.name} is NOT back to its state before the release: "
                                       + "; ".join(problems) + ". Page the service owner with the report.")
        self.log.info("Rollback of %s verified: %s, schema version %d, smoke tests pass.", service.name,
                      before["previous_task_definition"], version)
        return {"task_definition": live["taskDefinition"], "schema_version": version}


class ReleaseFailedOperator(BaseOperator):
    """release_failed: fail the run whenever a stage failed, so a rolled-back release is never shown green."""

    ui_color = "#f4a6a6"

    def execute(self, context: Any) -> None:
        states = run_task_states(context)
        failed = failed_stages(states)
        if states.get(FINALIZE) == "success" and not failed:
            raise AirflowSkipException("The release succeeded; nothing to fail.")
        if not failed and states.get(PREFLIGHT) == "success" and (stage_output(context, PREFLIGHT) or {}).get("dry_run"):
            raise AirflowSkipException("Dry run: nothing was changed.")
        rollback = ", ".join(f"{t} {states.get(t, 'none')}" for t in ROLLBACK_STAGES)
        raise AirflowFailException(f"Release failed at {', '.join(failed) or 'an unknown stage'}; rollback: "
                                   f"{rollback}. See the report task's log.")


class ReleaseReportOperator(ServiceStageOperator):
    """report: build the release report (JSON and Markdown), store it beside the backup, print it. Runs always."""

    def execute(self, context: Any) -> dict[str, Any]:
        catalog = load_catalog()
        service = catalog.get(self.service)
        ti = context["ti"]
        states = run_task_states(context)
        durations = {b["task_id"]: b.get("duration") for b in ti.get_task_breadcrumbs(ti.dag_id, ti.run_id)}
        order = [t for t in (*MAIN_STAGES, *ROLLBACK_STAGES, RELEASE_FAILED) if t in states]
        outputs = {task_id: stage_output(context, task_id) for task_id in order}
        report = build_report(
            dag_id=ti.dag_id, run_id=ti.run_id,
            triggered_by=getattr(context.get("dag_run"), "triggering_user_name", None),
            params=dict(context.get("params") or {}), states=states, durations=durations, outputs=outputs,
            after=self._after(service, catalog), stage_order=order)
        markdown = render_markdown(report)
        location = self._store(service, context, report, markdown, outputs)
        report["stored_at"] = location
        self.log.info("Release report (%s)%s:\n%s", report["outcome"], f", stored at {location}" if location else "",
                      markdown)
        return report

    def _after(self, service: Any, catalog: Any) -> dict[str, Any]:
        after: dict[str, Any] = {}
        try:
            ecs = EcsDeploymentHook(service.aws_conn_id)
            live = ecs.describe_service(service.ecs.cluster, service.ecs.service)
            after["task_definition"] = live["taskDefinition"]
            after["image"] = image_of(ecs.describe_task_definition(live["taskDefinition"]), service.ecs.container)
        except EcsDeploymentError as exc:
            after["ecs_error"] = str(exc)
        try:
            after["schema_version"] = migration_engine(service, catalog, "report", self.log).status().current_version
        except Exception as exc:  # noqa: BLE001 - the report must still be written
            after["schema_error"] = str(exc)
        return after

    def _store(self, service: Any, context: Any, report: dict, markdown: str, outputs: dict) -> str | None:
        before = outputs.get(PREFLIGHT) or {}
        bucket = (outputs.get(BACKUP) or {}).get("bucket") or before.get("backup_bucket")
        if not bucket:
            return None
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        prefix = f"{service.name}/{safe_key(context['run_id'])}/release-report"
        try:
            s3 = S3Hook(aws_conn_id=service.aws_conn_id).get_conn()
            s3.put_object(Bucket=bucket, Key=f"{prefix}.json", ServerSideEncryption="AES256",
                          Body=json.dumps(report, indent=2, default=str).encode(), ContentType="application/json")
            s3.put_object(Bucket=bucket, Key=f"{prefix}.md", ServerSideEncryption="AES256", Body=markdown.encode(),
                          ContentType="text/markdown")
        except Exception as exc:  # noqa: BLE001 - the log still has the report
            self.log.warning("Could not store the report in s3://%s/%s: %s", bucket, prefix, exc)
            return None
        return f"s3://{bucket}/{prefix}.json"


__all__ = ["REPORT", "ReleaseFailedOperator", "ReleaseFinalizeOperator", "ReleaseReportOperator",
           "VerifyRollbackOperator"]
