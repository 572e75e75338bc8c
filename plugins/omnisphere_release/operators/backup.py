"""backup and restore_backup: the database's way back, kept together as DESIGN.md asks."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from omnisphere_release.catalog import load_catalog
from omnisphere_release.hooks.backups import BackupError, BackupHook
from omnisphere_release.hooks.postgres import ServiceDatabaseHook
from omnisphere_release.operators.common import (BACKUP, PREFLIGHT, ROLLBACK_ECS, ROLLBACK_SCHEMA, run_task_states,
                                                 safe_key, stage_output)


def _s3(aws_conn_id: str | None) -> Any:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=aws_conn_id).get_conn()


class PostgresBackupToS3Operator(BaseOperator):
    """pg_dump the service database to S3 (custom format, sha256, server-side encryption), verified readable.

    The object key is derived from the run, so a retry overwrites its own dump instead of leaving a second one.
    """

    template_fields = ("service", "kms_key_id")

    def __init__(self, *, service: str, kms_key_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.kms_key_id = kms_key_id

    def execute(self, context: Any) -> dict[str, Any]:
        before = stage_output(context, PREFLIGHT)
        if before.get("dry_run"):
            raise AirflowSkipException("Dry run: preflight printed the plan; nothing is backed up or changed.")
        service = load_catalog().get(self.service)
        database = ServiceDatabaseHook(service.postgres_conn_id)
        bucket = before["backup_bucket"]
        key = f"{service.name}/{safe_key(context['run_id'])}/{service.name}.dump"
        self.log.info("Backing up %s (%s) to s3://%s/%s with pg_dump --format=custom ...", service.name,
                      database.describe(), bucket, key)
        try:
            record = BackupHook(database.connect_kwargs(), _s3(service.aws_conn_id)).dump_to_s3(
                bucket, key, self.kms_key_id or None)
        except BackupError as exc:
            raise AirflowException(f"Backup of {service.name} failed: {exc}. Nothing else changed; the release "
                                   f"stops here (retries if any remain).") from None
        self.log.info("Backed up %s: %.1f MB, %d objects listed by pg_restore, sha256 %s, dump %.1fs, upload %.1fs; "
                      "encrypted at rest. Next: schema_up.", record.uri, record.size_bytes / 1e6, record.objects,
                      record.sha256[:16], record.dump_seconds, record.upload_seconds)
        return record.to_dict()


class PostgresRestoreFromS3Operator(BaseOperator):
    """restore_backup: put the database back as the backup has it, when the schema rollback could not.

    Runs only when ECS is back on the previous revision and either the schema rollback failed (a down file failed,
    or a migration is irreversible) or the run's restore_policy is ``always``. Idempotent: restoring twice gives the
    same database.
    """

    template_fields = ("service", "restore_policy")

    def __init__(self, *, service: str, restore_policy: str = "when_needed", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.restore_policy = restore_policy

    def execute(self, context: Any) -> dict[str, Any]:
        states = run_task_states(context)
        if states.get(ROLLBACK_ECS) != "success":
            raise AirflowSkipException(
                f"No restore: rollback_ecs is {states.get(ROLLBACK_ECS)}. Restoring the database while the new "
                f"image may still serve traffic would break it; a person must decide (see the report).")
        schema_state = states.get(ROLLBACK_SCHEMA)
        needed = schema_state == "failed" or self.restore_policy == "always"
        if not needed:
            raise AirflowSkipException(f"No restore needed: rollback_schema is {schema_state} and restore_policy is "
                                       f"{self.restore_policy}.")
        backup = stage_output(context, BACKUP)
        if not backup:
            raise AirflowSkipException("No restore possible: this run took no backup (it failed before or at the "
                                       "backup stage, so the database was not changed by it).")
        service = load_catalog().get(self.service)
        database = ServiceDatabaseHook(service.postgres_conn_id)
        why = "the schema rollback failed" if schema_state == "failed" else "restore_policy is always"
        self.log.info("Restoring %s from %s because %s; checking its sha256 first.", database.describe(),
                      backup["uri"], why)
        try:
            seconds = BackupHook(database.connect_kwargs(), _s3(service.aws_conn_id)).restore_from_s3(
                backup["bucket"], backup["key"], backup["sha256"])
        except BackupError as exc:
            raise AirflowFailException(f"Restore of {service.name} from {backup['uri']} failed: {exc}. The database "
                                       f"is as it was before this step (the restore is one transaction). Page the "
                                       f"database owner.") from None
        self.log.info("Restored %s from %s in %.1fs (sha256 verified). Next: verify_rollback.", service.name,
                      backup["uri"], seconds)
        return {"restored_from": backup["uri"], "sha256": backup["sha256"], "seconds": round(seconds, 2),
                "reason": why}
