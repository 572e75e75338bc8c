"""rollback_<service>: the manual way back, each step optional: a previous task definition or image, the schema down
to a version, a restore from a chosen backup. Each step runs the same code as the release's own rollback branch:
:class:`~omnisphere_release.operators.ecs.EcsReturnServiceOperator`, :func:`~omnisphere_release.operators.migrations.revert_schema_to`
and :func:`~omnisphere_release.operators.backup.restore_database`."""

from __future__ import annotations

from typing import Any, TypedDict

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from omnisphere_release import checks
from omnisphere_release.catalog import Service, load_catalog
from omnisphere_release.hooks.backups import BackupHook
from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsDeploymentHook, image_of, pinned_image
from omnisphere_release.hooks.postgres import schema_engine
from omnisphere_release.hooks.registry import ImageRegistryHook
from omnisphere_release.operators.backup import restore_database
from omnisphere_release.operators.common import (
    ServiceStageOperator,
    as_optional_int,
    as_optional_text,
    hold_service,
    run_label,
)
from omnisphere_release.operators.ecs import EcsReturnServiceOperator
from omnisphere_release.operators.migrations import revert_schema_to

PLAN = "plan"
STEPS = ("ecs", "schema", "restore")


class RestoreSource(TypedDict):
    bucket: str
    key: str
    sha256: str


class ManualRollbackPlan(TypedDict, total=False):
    """What the plan task checked; each step runs only if its key is present."""

    service: str
    reason: str
    current_task_definition: str
    task_definition: str  # a task definition to run again
    image: str  # or an image to run (a revision of the current task definition is registered for it)
    schema_version: int
    restore: RestoreSource


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise AirflowFailException(f"param restore_backup_uri {uri!r} is not an s3://bucket/key address")
    bucket, key = uri[5:].split("/", 1)
    return bucket, key


class ManualRollbackPlanOperator(ServiceStageOperator):
    """Check the requested steps against what exists and print the plan; change nothing."""

    template_fields = ("service", "environment", "task_definition", "image_tag", "schema_version", "restore_backup_uri", "reason")

    def __init__(self, *, service: str, task_definition: Any, image_tag: Any, schema_version: Any,
                 restore_backup_uri: Any, reason: Any, **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        self.task_definition, self.image_tag = task_definition, image_tag
        self.schema_version, self.restore_backup_uri, self.reason = schema_version, restore_backup_uri, reason

    def execute(self, context: Context) -> ManualRollbackPlan:
        unknown = checks.unknown_conf_problem(getattr(context.get("dag_run"), "conf", None), self.dag.params.keys())
        if unknown:
            raise AirflowFailException(unknown)
        catalog = load_catalog()
        service = catalog.get(self.service, self.environment)
        # Params arrive as rendered text; "None" is an unset optional param.
        task_definition, image_tag = as_optional_text(self.task_definition), as_optional_text(self.image_tag)
        backup_uri, schema_version = as_optional_text(self.restore_backup_uri), as_optional_int(self.schema_version)
        self.reason = checks.plain_text(self.reason)
        if not self.reason:
            raise AirflowFailException("param 'reason' is required: say why this manual rollback happens")
        if task_definition and image_tag:
            raise AirflowFailException("give either param 'task_definition' or param 'image_tag', not both")
        if not any([task_definition, image_tag, schema_version is not None, backup_uri]):
            raise AirflowFailException("nothing to do: set task_definition or image_tag, schema_version, "
                                       "or restore_backup_uri")
        hold_service(context, service, f"manual rollback of {service.name} ({self.reason.strip()})", self.log)
        plan: ManualRollbackPlan = {"service": service.name, "reason": self.reason}
        try:
            if image_tag:
                target = checks.target_image(service, image_tag)
                # By the digest checked now, as a release deploys: the tag may be pushed again before the ECS step.
                plan["current_task_definition"] = target.running_task_definition
                plan["image"] = pinned_image(target.image, target.registry.digest)
                image_problem = target.problem
            elif task_definition:
                ecs = EcsDeploymentHook(service.aws_conn_id)
                chosen = ecs.describe_task_definition(task_definition)
                plan["task_definition"] = chosen["taskDefinitionArn"]
                image_problem = ImageRegistryHook(service.aws_conn_id).check(
                    image_of(chosen, service.ecs.container)).problem
            else:
                image_problem = None
        except EcsDeploymentError as exc:
            raise AirflowFailException(f"refused: {exc}") from None
        # An old image may have been expired by the registry's lifecycle policy: ECS could not start it, and the
        # way back would fail halfway, at the worst moment.
        if image_problem:
            raise AirflowFailException(f"refused, nothing was changed: {image_problem}")
        if schema_version is not None:
            current = schema_engine(service, catalog, "rollback plan", self.log).status().current_version
            if schema_version > current:
                raise AirflowFailException(f"param schema_version {schema_version} is above the current version "
                                           f"{current}; use release_{service.name} to go up")
            plan["schema_version"] = schema_version
        if backup_uri:
            plan["restore"] = self._restore_source(service, backup_uri)
        self.log.info("Manual rollback plan for %s: %s", service.name, plan)
        return plan

    @staticmethod
    def _restore_source(service: Service, uri: str) -> RestoreSource:
        bucket, key = parse_s3_uri(uri)
        try:
            checksum = BackupHook.for_service(service).recorded_sha256(bucket, key)
        except Exception as exc:  # noqa: BLE001 - the message matters, not the type
            raise AirflowFailException(f"param restore_backup_uri: cannot read {uri}: {exc}") from None
        if not checksum:
            raise AirflowFailException(f"{uri} carries no sha256 tag: not a backup taken by a release, so its "
                                       f"integrity cannot be checked")
        return {"bucket": bucket, "key": key, "sha256": checksum}


class ManualRollbackStepOperator(EcsReturnServiceOperator):
    """Run one step of the plan (``ecs``, ``schema`` or ``restore``), or skip it when the plan does not ask for it.

    The ECS step is the release's own way back (EcsReturnServiceOperator): it defers while ECS works.
    """

    def __init__(self, *, service: str, step: str, **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        if step not in STEPS:
            raise ValueError(f"step {step!r}: use one of {', '.join(STEPS)}")
        self.step = step

    def execute(self, context: Context) -> dict[str, Any]:
        plan: ManualRollbackPlan = context["ti"].xcom_pull(task_ids=PLAN)
        catalog = load_catalog()
        service = catalog.get(self.service, self.environment)
        if self.step == "ecs":
            if "task_definition" not in plan and "image" not in plan:
                raise AirflowSkipException("No ECS step requested.")
            target = plan.get("task_definition") or self._register_image(service, plan)
            return self.return_service_to(context, service, target)
        if self.step == "schema":
            if "schema_version" not in plan:
                raise AirflowSkipException("No schema step requested.")
            return revert_schema_to(service, catalog, plan["schema_version"],
                                    applied_by=run_label(self.dag_id, context["run_id"]), reason=plan["reason"],
                                    log=self.log, next_on_failure="The ECS step is not undone; decide whether to "
                                    "restore a backup (param restore_backup_uri).")
        if "restore" not in plan:
            raise AirflowSkipException("No restore requested.")
        r = plan["restore"]
        seconds = restore_database(service, r["bucket"], r["key"], r["sha256"], self.log)
        self.log.info("Restored %s from s3://%s/%s in %.1fs.", service.name, r["bucket"], r["key"], seconds)
        return {"restored_from": f"s3://{r['bucket']}/{r['key']}", "seconds": round(seconds, 2)}

    def _register_image(self, service: Service, plan: ManualRollbackPlan) -> str:
        """Register a revision of the current task definition with the plan's image (tagged as a manual rollback)."""
        ecs = EcsDeploymentHook(service.aws_conn_id)
        try:
            current = ecs.describe_task_definition(plan["current_task_definition"])
            return ecs.register_revision(current, service.ecs.container, plan["image"], "manual-rollback")
        except EcsDeploymentError as exc:
            raise AirflowFailException(f"ECS step could not register a revision with {plan['image']}: {exc}") from None
