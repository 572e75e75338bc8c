"""backup and restore_backup: the database's way back, kept together as DESIGN.md asks."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from omnisphere_release.catalog import Service, load_catalog
from omnisphere_release.checks import approval_problem
from omnisphere_release.contracts import APPROVE_RELEASE, ROLLBACK_ECS, ROLLBACK_SCHEMA, BackupOutput, ReleaseRun
from omnisphere_release.hooks.backups import BackupError, BackupHook
from omnisphere_release.hooks.postgres import ServiceDatabaseHook
from omnisphere_release.logs import Log
from omnisphere_release.operators.common import ServiceStageOperator, safe_key


def restore_database(service: Service, bucket: str, key: str, sha256: str, log: Log) -> float:
    """Restore ``service``'s database from a backup after checking its sha256; return the seconds it took.

    The one restore path of the release's restore_backup and of rollback_<service>. A failure fails the task for
    good (no retry): the restore is one transaction, so the database is as it was, and a person must look.
    """
    uri = f"s3://{bucket}/{key}"
    log.info("Restoring %s (%s) from %s; checking its sha256 first.", service.name,
             ServiceDatabaseHook(service.postgres_conn_id).describe(), uri)
    try:
        return BackupHook.for_service(service).restore_from_s3(bucket, key, sha256)
    except BackupError as exc:
        raise AirflowFailException(f"Restore of {service.name} from {uri} failed: {exc}. The database is as it was "
                                   f"before this step (the restore is one transaction). Page the database "
                                   f"owner.") from None


class PostgresBackupToS3Operator(ServiceStageOperator):
    """pg_dump the service database to S3 (custom format, sha256, server-side encryption), verified readable.

    The object key is derived from the run, so a retry overwrites its own dump instead of leaving a second one.
    """

    template_fields = ("service", "environment", "kms_key_id")

    def __init__(self, *, service: str, kms_key_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        self.kms_key_id = kms_key_id

    def execute(self, context: Context) -> BackupOutput:
        plan = ReleaseRun(context).plan
        if plan is None or plan["dry_run"]:
            raise AirflowSkipException("Dry run: preflight printed the plan; nothing is backed up or changed.")
        catalog = load_catalog()
        service = catalog.get(self.service, self.environment)
        # The first stage that changes anything checks the approval on its record, not on approve_release's state.
        unapproved = approval_problem(catalog.environment(self.environment),
                                      context["ti"].xcom_pull(task_ids=APPROVE_RELEASE))
        if unapproved:
            raise AirflowFailException(f"Refused: {unapproved}.")
        bucket = plan["backup_bucket"]
        key = f"{service.name}/{safe_key(context['run_id'])}/{service.name}.dump"
        self.log.info("Backing up %s (%s) to s3://%s/%s with pg_dump --format=custom ...", service.name,
                      ServiceDatabaseHook(service.postgres_conn_id).describe(), bucket, key)
        try:
            record = BackupHook.for_service(service).dump_to_s3(bucket, key, self.kms_key_id or None)
        except BackupError as exc:
            raise AirflowException(f"Backup of {service.name} failed: {exc}. Nothing else changed; the release "
                                   f"stops here (retries if any remain).") from None
        self.log.info("Backed up %s: %.1f MB, %d objects listed by pg_restore, sha256 %s, dump %.1fs, upload %.1fs; "
                      "encrypted at rest. Next: schema_up.", record.uri, record.size_bytes / 1e6, record.objects,
                      record.sha256[:16], record.dump_seconds, record.upload_seconds)
        return record.to_dict()  # type: ignore[return-value]  # BackupOutput is its JSON shape


class PostgresRestoreFromS3Operator(ServiceStageOperator):
    """restore_backup: put the database back as the backup has it, when the schema rollback could not.

    Runs only when ECS is back on the previous revision and either the schema rollback failed (a down file failed,
    or a migration is irreversible) or the run's restore_policy is ``always``. Idempotent: restoring twice gives the
    same database.
    """

    template_fields = ("service", "environment", "restore_policy")

    def __init__(self, *, service: str, restore_policy: str = "when_needed", **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        self.restore_policy = restore_policy

    def execute(self, context: Context) -> dict[str, Any]:
        run = ReleaseRun(context)
        states = run.task_states()
        if states.get(ROLLBACK_ECS) != "success":
            raise AirflowSkipException(
                f"No restore: rollback_ecs is {states.get(ROLLBACK_ECS)}. Restoring the database while the new "
                f"image may still serve traffic would break it; a person must decide (see the report).")
        schema_state = states.get(ROLLBACK_SCHEMA)
        if schema_state != "failed" and self.restore_policy != "always":
            raise AirflowSkipException(f"No restore needed: rollback_schema is {schema_state} and restore_policy is "
                                       f"{self.restore_policy}.")
        backup = run.backup
        if not backup:
            raise AirflowSkipException("No restore possible: this run took no backup (it failed before or at the "
                                       "backup stage, so the database was not changed by it).")
        service = load_catalog().get(self.service, self.environment)
        why = "the schema rollback failed" if schema_state == "failed" else "restore_policy is always"
        self.log.info("Restoring because %s.", why)
        seconds = restore_database(service, backup["bucket"], backup["key"], backup["sha256"], self.log)
        self.log.info("Restored %s from %s in %.1fs (sha256 verified). Next: verify_rollback.", service.name,
                      backup["uri"], seconds)
        return {"restored_from": backup["uri"], "sha256": backup["sha256"], "seconds": round(seconds, 2),
                "reason": why}
