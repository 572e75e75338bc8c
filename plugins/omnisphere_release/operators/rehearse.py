"""The stages of ``rehearse_<service>``: a copy of the environment's database on the scratch server, the pending
migrations and data migrations applied to it with their durations and locks measured, the integrity checks, then
the copy dropped and the rehearsal's report kept as evidence. Nothing here writes to the environment's database: it
is only read, by pg_dump, when no backup of it exists yet."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import psycopg2
from airflow.sdk import Context, Variable
from airflow.sdk.exceptions import AirflowFailException

from omnisphere_release.catalog import Catalog, Service, load_catalog
from omnisphere_release.contracts import ReleaseRun
from omnisphere_release.datamigrate import DataMigrationEngine, discover_specs
from omnisphere_release.hooks.aws import aws_client
from omnisphere_release.hooks.backups import BackupError, BackupHook
from omnisphere_release.hooks.postgres import ServiceDatabaseHook
from omnisphere_release.migrations import EngineSettings, InvalidMigrationInput, MigrationEngine
from omnisphere_release.migrations.engine import version_label
from omnisphere_release.operators.common import (
    ServiceStageOperator,
    as_optional_int,
    backup_bucket_of,
    run_label,
    safe_key,
)
from omnisphere_release.operators.integrity import check_files
from omnisphere_release.rehearsal import REHEARSAL_CONN_ID, ScratchDatabase, apply_measured, scratch_name

RESTORE_COPY, APPLY_MIGRATIONS, APPLY_DATA_MIGRATIONS, CHECK_COPY, DROP_COPY, REHEARSAL_REPORT = (
    "restore_copy", "apply_migrations", "apply_data_migrations", "integrity_check", "drop_copy", "rehearsal_report")
REHEARSAL_STAGES = (RESTORE_COPY, APPLY_MIGRATIONS, APPLY_DATA_MIGRATIONS, CHECK_COPY, DROP_COPY)


def scratch_for(context: Context, service: Service) -> ScratchDatabase:
    """Return this run's scratch database on the scratch server (the same name on every try and every task)."""
    admin = ServiceDatabaseHook(REHEARSAL_CONN_ID).connect_kwargs()
    return ScratchDatabase(admin, scratch_name(service.name, context["run_id"]))


class RehearsalStageOperator(ServiceStageOperator):
    """A stage of a rehearsal: the service as it runs in the run's environment, and this run's scratch copy."""

    def target(self, context: Context) -> tuple[Catalog, Service, ScratchDatabase]:
        catalog = load_catalog()
        service = catalog.get(self.service, self.environment)
        return catalog, service, scratch_for(context, service)


class RestoreCopyOperator(RehearsalStageOperator):
    """restore_copy: the newest verified backup of the environment's database (or the one named by ``backup_uri``; or,
    with none, a fresh pg_dump of it, which only reads), restored into a new scratch database."""

    template_fields = ("service", "environment", "backup_uri")

    def __init__(self, *, backup_uri: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backup_uri = backup_uri

    def execute(self, context: Context) -> dict[str, Any]:
        catalog, service, scratch = self.target(context)
        environment = catalog.environment(self.environment)
        bucket = backup_bucket_of(environment)
        hook = BackupHook.for_service(service)
        bucket, key, sha256, source = self._backup(context, service, hook, bucket)
        self.log.info("Restoring s3://%s/%s (%s) into the scratch database %s on %s.", bucket, key, source,
                      scratch.name, ServiceDatabaseHook(REHEARSAL_CONN_ID).describe())
        scratch.create()
        try:
            seconds = BackupHook(scratch.connect_kwargs, hook.s3).restore_from_s3(bucket, key, sha256)
        except BackupError as exc:
            raise AirflowFailException(f"Could not restore the copy of {service.name} ({environment.name}): {exc}. "
                                       f"{environment.name} was not touched; drop_copy removes the scratch "
                                       f"database.") from None
        self.log.info("Copy of %s (%s) ready in %s: restored in %.1fs. Next: the pending migrations.", service.name,
                      environment.name, scratch.name, seconds)
        return {"scratch_database": scratch.name, "backup_uri": f"s3://{bucket}/{key}", "backup_source": source,
                "restore_seconds": round(seconds, 2)}

    def _backup(self, context: Context, service: Service, hook: BackupHook,
                bucket: str) -> tuple[str, str, str, str]:
        """Return (bucket, key, sha256, how it was found) of the backup to restore."""
        uri = str(self.backup_uri or "").strip()
        if uri and uri != "None":
            given_bucket, _, key = uri.removeprefix("s3://").partition("/")
            sha256 = hook.recorded_sha256(given_bucket, key)
            if not sha256:
                raise AirflowFailException(f"param backup_uri: {uri} has no sha256 tag (it is not a complete backup "
                                           f"taken by a release): name another, or leave it empty for the newest.")
            return given_bucket, key, sha256, "the backup named by param backup_uri"
        if not bucket:
            raise AirflowFailException("No backup bucket is set for this environment (its Variable is empty): set it, "
                                       "or name a backup with param backup_uri.")
        newest = self._newest_backup(hook, bucket, service.name)
        if newest:
            key, sha256 = newest
            return bucket, key, sha256, "the newest verified backup"
        key = f"{service.name}/rehearsals/{safe_key(context['run_id'])}.dump"
        self.log.info("No backup of %s in s3://%s yet: taking a fresh pg_dump (it only reads) to s3://%s/%s.",
                      service.name, bucket, bucket, key)
        try:
            record = hook.dump_to_s3(bucket, key)
        except BackupError as exc:
            raise AirflowFailException(f"Fresh dump of {service.name} failed: {exc}. Nothing was changed.") from None
        return bucket, key, record.sha256, f"a fresh dump ({record.size_bytes / 1e6:.1f} MB in {record.dump_seconds:.1f}s)"

    @staticmethod
    def _newest_backup(hook: BackupHook, bucket: str, service: str) -> tuple[str, str] | None:
        """Return the key and sha256 of the newest complete backup of ``service`` (tagged once verified)."""
        pages = hook.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{service}/")
        dumps = sorted((o for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".dump")),
                       key=lambda o: o["LastModified"], reverse=True)
        for obj in dumps:
            sha256 = hook.recorded_sha256(bucket, obj["Key"])
            if sha256:
                return obj["Key"], sha256
        return None


class ApplyMigrationsToCopyOperator(RehearsalStageOperator):
    """apply_migrations: the pending schema migrations, applied to the copy as a release would apply them (same lock
    settings), each one timed, with the table locks they take watched from a second session."""

    template_fields = ("service", "environment", "target_version")

    def __init__(self, *, target_version: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target_version = target_version

    def execute(self, context: Context) -> dict[str, Any]:
        catalog, service, scratch = self.target(context)
        application = f"omni-rehearsal-{scratch.name}"[:63]
        engine = MigrationEngine(service.name, catalog.migrations_dir(service.name),
                                 lambda: scratch.connect(application),
                                 EngineSettings.from_catalog(service.migrations),
                                 applied_by=f"rehearsal {run_label(self.dag_id, context['run_id'])}", log=self.log)
        try:
            plan = engine.plan("up", as_optional_int(self.target_version))
        except InvalidMigrationInput as exc:
            raise AirflowFailException(f"The migrations of {service.name} were refused on the copy: {exc}") from None
        try:
            measured = apply_measured(engine, scratch, plan, application, service.migrations.lock_timeout_ms, self.log)
        except (InvalidMigrationInput, psycopg2.Error) as exc:
            raise AirflowFailException(f"A migration of {service.name} failed on the copy: {str(exc).strip()}. The "
                                       f"release would fail the same way; the environment was not touched.") from None
        locks = measured["locks"]
        self.log.info("Schema of the copy: %s -> %s in %.1fs. Heaviest lock: %s.", version_label(plan.current_version),
                      version_label(plan.target_version), measured["seconds"],
                      f"{locks[0]['mode']} on {locks[0]['relation']}" if locks else "none")
        return {"from_version": plan.current_version, "to_version": plan.target_version, **measured}


class ApplyDataMigrationsToCopyOperator(RehearsalStageOperator):
    """apply_data_migrations: every data migration of the service, run to the end on the copy, timed."""

    def execute(self, context: Context) -> dict[str, Any]:
        catalog, service, scratch = self.target(context)
        try:
            specs = discover_specs(catalog.sql_dir / service.name / "data")
        except InvalidMigrationInput as exc:
            raise AirflowFailException(str(exc)) from None
        runs: list[dict[str, Any]] = []
        for spec in specs:
            engine = DataMigrationEngine(spec, scratch.connect, run_by=f"rehearsal run={context['run_id']}",
                                         log=self.log)
            try:
                result = engine.run("forward")
            except psycopg2.Error as exc:
                raise AirflowFailException(f"Data migration {spec.name} failed on the copy: {str(exc).strip()}. "
                                           f"Production was not touched.") from None
            self.log.info("Data migration %s: %d rows in %d batches, %.1fs (%.0f rows/s) on the copy.", spec.name,
                          result.rows, result.batches, result.seconds, result.rows_per_second)
            runs.append({"name": spec.name, "rows": result.rows, "batches": result.batches,
                         "seconds": round(result.seconds, 2)})
        if not specs:
            self.log.info("%s has no data migration.", service.name)
        return {"data_migrations": runs, "seconds": round(sum(r["seconds"] for r in runs), 2)}


class CheckCopyOperator(RehearsalStageOperator):
    """integrity_check: the service's SQL checks on the migrated copy (a check passes when it returns no row)."""

    def execute(self, context: Context) -> dict[str, Any]:
        catalog, service, scratch = self.target(context)
        files = check_files(catalog.checks_dir(service.name))
        failures = []
        started = datetime.now(timezone.utc)
        conn = scratch.connect()
        try:
            for path in files:
                with conn, conn.cursor() as cur:
                    cur.execute(path.read_text(encoding="utf-8"))
                    rows = cur.fetchmany(5)
                if rows:
                    failures.append(f"check {path.stem} ({path}) returned rows, e.g. {rows}")
                else:
                    self.log.info("Check %s passed on the copy.", path.stem)
        finally:
            conn.close()
        if failures:
            raise AirflowFailException("Integrity checks failed on the migrated copy; the release would fail them "
                                       "too:\n" + "\n".join(f"  - {f}" for f in failures))
        seconds = (datetime.now(timezone.utc) - started).total_seconds()
        return {"checks": [p.stem for p in files], "seconds": round(seconds, 2)}


class DropCopyOperator(RehearsalStageOperator):
    """drop_copy: drop the scratch database, whatever happened before (a copy of production must not linger)."""

    def execute(self, context: Context) -> dict[str, Any]:
        _, service, scratch = self.target(context)
        existed = scratch.drop()
        self.log.info("Scratch database %s %s.", scratch.name, "dropped" if existed else "was not there")
        return {"dropped": scratch.name if existed else None}


class RehearsalReportOperator(RehearsalStageOperator):
    """rehearsal_report: what each stage took and which locks it held; kept in the evidence bucket, where preflight's
    window-fit check finds it. Fails the run when a stage failed (the report is stored first)."""

    def execute(self, context: Context) -> dict[str, Any]:
        catalog, service, _ = self.target(context)
        environment = catalog.environment(self.environment)
        ti = context["ti"]
        states = {t: s for t, s in ReleaseRun(context).task_states().items() if t in REHEARSAL_STAGES}
        outputs = {task_id: ti.xcom_pull(task_ids=task_id) for task_id in REHEARSAL_STAGES}
        failed = [t for t, s in states.items() if s in ("failed", "upstream_failed")]
        measured = [APPLY_MIGRATIONS, APPLY_DATA_MIGRATIONS]
        seconds = sum(float((outputs.get(t) or {}).get("seconds") or 0) for t in measured)
        outcome = "failed" if failed else "passed"
        report: dict[str, Any] = {
            "kind": "rehearsal", "service": service.name, "environment": environment.name,
            "dag_id": ti.dag_id, "run_id": ti.run_id,
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "outcome": outcome, "failed_stages": failed,
            "release_minutes": round(seconds / 60, 2),
            "copy": outputs.get(RESTORE_COPY), "migrations": outputs.get(APPLY_MIGRATIONS),
            "data_migrations": outputs.get(APPLY_DATA_MIGRATIONS), "integrity": outputs.get(CHECK_COPY),
            "states": states,
        }
        location = self._store(service, environment.name, report)
        self.log.info("Rehearsal of %s on a copy of %s: %s. Migrations and data migrations took %.1f min%s.%s",
                      service.name, environment.name, outcome.upper(), report["release_minutes"],
                      f"; report kept at {location}" if location else "",
                      f" Failed at: {', '.join(failed)}; {environment.name} was not touched." if failed else "")
        if failed:
            raise AirflowFailException(f"Rehearsal failed at {', '.join(failed)}; {environment.name} was not touched. "
                                       f"See those tasks' logs.")
        return report

    def _store(self, service: Service, environment: str, report: dict[str, Any]) -> str | None:
        bucket = str(Variable.get(load_catalog().evidence_bucket_variable, default="") or "")
        if not bucket:
            self.log.warning("No evidence bucket (Variable %s): the rehearsal is not kept as evidence.",
                             load_catalog().evidence_bucket_variable)
            return None
        key = f"rehearsals/{service.name}/{environment}/{safe_key(report['run_id'])}.json"
        try:
            aws_client("s3", service.aws_conn_id).put_object(Bucket=bucket, Key=key, Body=json.dumps(report).encode(),
                                                            ContentType="application/json")
        except Exception as exc:  # noqa: BLE001 - the log has the report; the rehearsal's outcome stands
            self.log.warning("Could not keep the rehearsal report in s3://%s/%s: %s", bucket, key, exc)
            return None
        return f"s3://{bucket}/{key}"
