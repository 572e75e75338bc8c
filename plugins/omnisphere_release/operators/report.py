"""report and release_failed: the release report, written whatever happened, and the task that keeps a rolled-back
release from ever showing green."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from omnisphere_release.catalog import Catalog, Service, load_catalog
from omnisphere_release.contracts import (
    APPROVE_RELEASE,
    BACKUP,
    FINALIZE,
    MAIN_STAGES,
    MONITORING_GATE,
    PREFLIGHT,
    RELEASE_FAILED,
    ROLLBACK_STAGES,
    ReleaseRun,
    failed_stages,
)
from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsDeploymentHook
from omnisphere_release.hooks.evidence import record_evidence
from omnisphere_release.hooks.postgres import schema_engine
from omnisphere_release.hooks.reports import ReleaseReportStoreHook
from omnisphere_release.operators.common import ServiceStageOperator, release_service, safe_key
from omnisphere_release.report import build_report, render_markdown


class ReleaseFailedOperator(BaseOperator):
    """release_failed: fail the run whenever a stage failed, so a rolled-back release is never shown green."""

    ui_color = "#f4a6a6"

    def execute(self, context: Context) -> None:
        run = ReleaseRun(context)
        states = run.task_states()
        failed = failed_stages(states)
        if states.get(FINALIZE) == "success" and not failed:
            raise AirflowSkipException("The release succeeded; nothing to fail.")
        plan = run.plan
        if not failed and states.get(PREFLIGHT) == "success" and plan and plan["dry_run"]:
            raise AirflowSkipException("Dry run: nothing was changed.")
        if failed == [APPROVE_RELEASE]:  # ended before anything changed: the rollback steps had nothing to undo
            approval = run.approval
            raise AirflowFailException(
                f"The release did not run: approve_release ended it ({approval.get('outcome') or 'failed'}"
                + (f", by {approval['rejected_by']}" if approval.get("rejected_by") else "")
                + "); nothing was changed. See approve_release's log and the report.")
        rollback = ", ".join(f"{t} {states.get(t, 'none')}" for t in ROLLBACK_STAGES)
        raise AirflowFailException(f"Release failed at {', '.join(failed) or 'an unknown stage'}; rollback: "
                                   f"{rollback}. See the report task's log.")


class ReleaseReportOperator(ServiceStageOperator):
    """report: build the release report (JSON and Markdown), store it beside the backup, print it. Runs always."""

    def execute(self, context: Context) -> dict[str, Any]:
        catalog = load_catalog()
        service = catalog.get(self.service, self.environment)
        run = ReleaseRun(context)
        ti = context["ti"]
        states = run.task_states()
        # The runtime task instance has it; the protocol it is typed with does not list it (yet).
        breadcrumbs = ti.get_task_breadcrumbs(ti.dag_id, ti.run_id)  # type: ignore[attr-defined]
        durations = {b["task_id"]: b.get("duration") for b in breadcrumbs}
        order = [t for t in (*MAIN_STAGES, *ROLLBACK_STAGES, RELEASE_FAILED) if t in states]
        outputs = {task_id: run.output(task_id) for task_id in order}
        dag_run = context.get("dag_run")
        report = build_report(
            dag_id=ti.dag_id, run_id=ti.run_id, triggered_by=getattr(dag_run, "triggering_user_name", None),
            params=dict(context.get("params") or {}), states=states, durations=durations, outputs=outputs,
            after=self._after(service, catalog), stage_order=order,
            bake=ti.xcom_pull(task_ids=MONITORING_GATE, key="bake"))
        markdown = render_markdown(report)
        location = self._store(service, context["run_id"], report, markdown, outputs)
        report["stored_at"] = location
        report["evidence_at"] = record_evidence(report, outputs.get(PREFLIGHT), catalog, service.aws_conn_id, self.log)
        self.log.info("Release report (%s)%s:\n%s", report["outcome"], f", stored at {location}" if location else "",
                      markdown)
        release_service(context, service, self.log)
        return report

    def _after(self, service: Service, catalog: Catalog) -> dict[str, Any]:
        after: dict[str, Any] = {}
        try:
            live = EcsDeploymentHook(service.aws_conn_id).live_revision(service.ecs.cluster, service.ecs.service,
                                                                        service.ecs.container)
            after["task_definition"], after["image"] = live.arn, live.image
        except EcsDeploymentError as exc:
            after["ecs_error"] = str(exc)
        try:
            after["schema_version"] = schema_engine(service, catalog, "report", self.log).status().current_version
        except Exception as exc:  # noqa: BLE001 - the report must still be written
            after["schema_error"] = str(exc)
        return after

    def _store(self, service: Service, run_id: str, report: dict[str, Any], markdown: str,
               outputs: dict[str, Any]) -> str | None:
        bucket = (outputs.get(BACKUP) or {}).get("bucket") or (outputs.get(PREFLIGHT) or {}).get("backup_bucket")
        if not bucket:
            return None
        prefix = f"{service.name}/{safe_key(run_id)}"
        try:
            return ReleaseReportStoreHook(aws_conn_id=service.aws_conn_id).store(bucket, prefix, report, markdown)
        except Exception as exc:  # noqa: BLE001 - the log still has the report
            self.log.warning("Could not store the report in s3://%s/%s: %s", bucket, prefix, exc)
            return None
