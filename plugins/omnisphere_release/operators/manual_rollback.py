"""rollback_<service>: the manual way back, each step optional: a previous task definition or image, the schema down
to a version, a restore from a chosen backup. The same hooks as the release's own rollback branch."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from omnisphere_release.catalog import load_catalog
from omnisphere_release.hooks.backups import BackupError, BackupHook
from omnisphere_release.hooks.ecs import (EcsDeploymentError, EcsDeploymentHook, deployment_configuration, image_of,
                                          summarize, with_image)
from omnisphere_release.hooks.postgres import ServiceDatabaseHook
from omnisphere_release.hooks.registry import ImageRegistryHook
from omnisphere_release.migrations import InvalidMigrationInput, MigrationFailed
from omnisphere_release.operators.common import as_optional_int
from omnisphere_release.operators.preflight import migration_engine

PLAN = "plan"


def _s3(aws_conn_id: str | None) -> Any:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=aws_conn_id).get_conn()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise AirflowFailException(f"param restore_backup_uri {uri!r} is not an s3://bucket/key address")
    bucket, key = uri[5:].split("/", 1)
    return bucket, key


class ManualRollbackPlanOperator(BaseOperator):
    """Check the requested steps against what exists and print the plan; change nothing."""

    template_fields = ("service", "task_definition", "image_tag", "schema_version", "restore_backup_uri", "reason")

    def __init__(self, *, service: str, task_definition: Any, image_tag: Any, schema_version: Any,
                 restore_backup_uri: Any, reason: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service, self.task_definition, self.image_tag = service, task_definition, image_tag
        self.schema_version, self.restore_backup_uri, self.reason = schema_version, restore_backup_uri, reason

    def execute(self, context: Any) -> dict[str, Any]:
        catalog = load_catalog()
        service = catalog.get(self.service)
        # Params arrive as rendered text; "None" is an unset optional param.
        self.task_definition, self.image_tag, self.restore_backup_uri = (
            None if str(v) in {"None", ""} else str(v)
            for v in (self.task_definition, self.image_tag, self.restore_backup_uri))
        self.schema_version = as_optional_int(self.schema_version)
        if not (self.reason or "").strip():
            raise AirflowFailException("param 'reason' is required: say why this manual rollback happens")
        if self.task_definition and self.image_tag:
            raise AirflowFailException("give either param 'task_definition' or param 'image_tag', not both")
        if not any([self.task_definition, self.image_tag, self.schema_version is not None, self.restore_backup_uri]):
            raise AirflowFailException("nothing to do: set task_definition or image_tag, schema_version, "
                                       "or restore_backup_uri")
        ecs = EcsDeploymentHook(service.aws_conn_id)
        plan: dict[str, Any] = {"service": service.name, "reason": self.reason}
        try:
            live = ecs.describe_service(service.ecs.cluster, service.ecs.service)
            current = ecs.describe_task_definition(live["taskDefinition"])
            plan["current_task_definition"] = live["taskDefinition"]
            image = None
            if self.task_definition:
                chosen = ecs.describe_task_definition(self.task_definition)
                plan["task_definition"] = chosen["taskDefinitionArn"]
                image = image_of(chosen, service.ecs.container)
            elif self.image_tag:
                image = plan["image"] = with_image(image_of(current, service.ecs.container), self.image_tag)
        except EcsDeploymentError as exc:
            raise AirflowFailException(f"refused: {exc}") from None
        if image:
            # An old image may have been expired by the registry's lifecycle policy: ECS could not start it, and the
            # way back would fail halfway, at the worst moment.
            check = ImageRegistryHook(service.aws_conn_id).check(image)
            if check.problem:
                raise AirflowFailException(f"refused, nothing was changed: {check.problem}")
        if self.schema_version is not None:
            status = migration_engine(service, catalog, "rollback plan", self.log).status()
            if int(self.schema_version) > status.current_version:
                raise AirflowFailException(f"param schema_version {self.schema_version} is above the current "
                                           f"version {status.current_version}; use release_{service.name} to go up")
            plan["schema_version"] = int(self.schema_version)
        if self.restore_backup_uri:
            bucket, key = parse_s3_uri(self.restore_backup_uri)
            hook = BackupHook({}, _s3(service.aws_conn_id))
            try:
                checksum = hook.recorded_sha256(bucket, key)
            except Exception as exc:  # noqa: BLE001 - the message matters, not the type
                raise AirflowFailException(f"param restore_backup_uri: cannot read {self.restore_backup_uri}: {exc}")
            if not checksum:
                raise AirflowFailException(f"{self.restore_backup_uri} carries no sha256 tag: not a backup taken by "
                                           f"a release, so its integrity cannot be checked")
            plan["restore"] = {"bucket": bucket, "key": key, "sha256": checksum}
        self.log.info("Manual rollback plan for %s: %s", service.name, plan)
        return plan


class ManualRollbackStepOperator(BaseOperator):
    """Run one step of the plan (``ecs``, ``schema`` or ``restore``), or skip it when the plan does not ask for it."""

    template_fields = ("service",)
    ui_color = "#f8e0d8"

    def __init__(self, *, service: str, step: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.step = step

    def execute(self, context: Any) -> dict[str, Any]:
        plan = context["ti"].xcom_pull(task_ids=PLAN)
        catalog = load_catalog()
        service = catalog.get(self.service)
        if self.step == "ecs":
            return self._ecs(service, plan)
        if self.step == "schema":
            return self._schema(service, catalog, plan, context)
        return self._restore(service, plan)

    def _ecs(self, service: Any, plan: dict[str, Any]) -> dict[str, Any]:
        if "task_definition" not in plan and "image" not in plan:
            raise AirflowSkipException("No ECS step requested.")
        ecs = EcsDeploymentHook(service.aws_conn_id)
        try:
            target = plan.get("task_definition")
            if target is None:
                current = ecs.describe_task_definition(plan["current_task_definition"])
                target = ecs.register_revision(current, service.ecs.container, plan["image"], "manual-rollback")
            live = ecs.describe_service(service.ecs.cluster, service.ecs.service)
            if live["taskDefinition"] == target:
                self.log.info("%s already runs %s; nothing to do.", service.name, target)
                return {"task_definition": target, "action": "none"}
            arn = ecs.update_service(service.ecs.cluster, service.ecs.service, target,
                                     deployment_configuration("rolling", 0))
            settled = ecs.wait_until_settled(arn, service.deploy.timeout_minutes * 60)
        except EcsDeploymentError as exc:
            raise AirflowFailException(f"ECS step failed: {exc}") from None
        if settled["status"] != "SUCCESSFUL":
            raise AirflowFailException(f"ECS step ended {summarize(settled)}")
        self.log.info("%s now runs %s (%s).", service.name, target, summarize(settled))
        return {"task_definition": target, "action": "deployed"}

    def _schema(self, service: Any, catalog: Any, plan: dict[str, Any], context: Any) -> dict[str, Any]:
        if "schema_version" not in plan:
            raise AirflowSkipException("No schema step requested.")
        engine = migration_engine(service, catalog, f"dag={self.dag_id} run={context['run_id']}", self.log)
        if engine.status().current_version == plan["schema_version"]:
            return {"reverted": [], "schema_version": plan["schema_version"]}
        try:
            result = engine.migrate("down", plan["schema_version"], reason=plan["reason"])
        except (InvalidMigrationInput, MigrationFailed) as exc:
            raise AirflowFailException(f"schema step failed: {exc}") from None
        return {"reverted": result.versions, "schema_version": result.to_version}

    def _restore(self, service: Any, plan: dict[str, Any]) -> dict[str, Any]:
        if "restore" not in plan:
            raise AirflowSkipException("No restore requested.")
        r = plan["restore"]
        database = ServiceDatabaseHook(service.postgres_conn_id)
        try:
            seconds = BackupHook(database.connect_kwargs(), _s3(service.aws_conn_id)).restore_from_s3(
                r["bucket"], r["key"], r["sha256"])
        except BackupError as exc:
            raise AirflowFailException(f"restore failed, database unchanged: {exc}") from None
        self.log.info("Restored %s from s3://%s/%s in %.1fs.", service.name, r["bucket"], r["key"], seconds)
        return {"restored_from": f"s3://{r['bucket']}/{r['key']}", "seconds": round(seconds, 2)}
