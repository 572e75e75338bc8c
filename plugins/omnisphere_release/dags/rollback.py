"""The factory of ``rollback_<service>``: the manual way back, each step optional, in the release's rollback order."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, BaseOperator, Param, TriggerRule

from omnisphere_release.catalog import Catalog, Service
from omnisphere_release.dags.release import environment_param
from omnisphere_release.operators.common import ENVIRONMENT_TEMPLATE
from omnisphere_release.operators.manual_rollback import PLAN, ManualRollbackPlanOperator, ManualRollbackStepOperator
from omnisphere_release.params import IMAGE_TAG_PATTERN, optional_text


def build_rollback_dag(service: Service, catalog: Catalog) -> DAG:
    name = service.name
    with DAG(
        dag_id=f"rollback_{name}",
        description=f"Manually roll {name} back: task definition or image, schema version, backup restore",
        doc_md=f"""
### rollback_{name}

The manual way back for **{name}**, for when a release succeeded but should not have, or a rollback needs a person.
Each step is optional and runs in this order: ECS (`task_definition` ARN, or `image_tag` of the same repository),
schema (`schema_version`: revert every migration above it), restore (`restore_backup_uri`: an `s3://` backup taken by a
release; its sha256 is checked before anything is restored). `plan` checks everything first and changes nothing.
""",
        schedule=None,
        catchup=False,
        max_active_runs=1,
        # Templates render as text: native rendering would turn an image tag like 1.10 into the float 1.1.
        render_template_as_native_obj=False,
        tags=["omnisphere", "rollback", name],
        # Bounded like the release's own rollback: an ECS return (stop, then redeploy), a schema revert, a restore.
        default_args={"environment": ENVIRONMENT_TEMPLATE, "owner": service.team or "platform", "retries": 1, "retry_delay": timedelta(seconds=20),
                      "execution_timeout": max(timedelta(hours=3), timedelta(minutes=2 * service.deploy.timeout_minutes + 20))},
        params={
            "environment": environment_param(catalog),
            "task_definition": Param(None, type=["null", "string"], description="Task definition ARN to run again."),
            "image_tag": Param(None, type=["null", "string"], pattern=IMAGE_TAG_PATTERN,
                               description="Or: an image tag to deploy (same repository)."),
            # -1 is the engine's "nothing applied" (NOTHING_APPLIED): golang-migrate sets start at version 0.
            "schema_version": Param(None, type=["null", "integer"], minimum=-1,
                                    description="Revert every migration above this version (it stays applied); "
                                                "-1 reverts every migration, version 0 included."),
            "restore_backup_uri": Param(None, type=["null", "string"], pattern=r"^s3://[^/]+/.+$",
                                        description="Restore the database from this backup."),
            "reason": optional_text("Why (required)."),
        },
    ) as dag:
        plan = ManualRollbackPlanOperator(
            task_id=PLAN, service=name, task_definition="{{ params.task_definition }}",
            image_tag="{{ params.image_tag }}", schema_version="{{ params.schema_version }}",
            restore_backup_uri="{{ params.restore_backup_uri }}", reason="{{ params.reason or '' }}", retries=0)
        previous: BaseOperator = plan
        for step in ("ecs", "schema", "restore"):
            task = ManualRollbackStepOperator(task_id=f"rollback_{step}", service=name, step=step,
                                              trigger_rule=TriggerRule.NONE_FAILED)
            previous >> task
            previous = task
    return dag
