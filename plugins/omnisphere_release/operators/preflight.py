"""preflight: validate everything that can be validated before anything changes, and record the "before" state."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException
from psycopg2 import sql

from omnisphere_release.catalog import load_catalog
from omnisphere_release.hooks.backups import BackupError, BackupHook
from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsDeploymentHook, image_of, with_image
from omnisphere_release.hooks.postgres import ServiceDatabaseHook
from omnisphere_release.hooks.registry import ImageRegistryHook
from omnisphere_release.migrations import EngineSettings, InvalidMigrationInput, MigrationEngine
from omnisphere_release.operators.common import WAIT_FOR_WINDOW, as_bool, as_optional_int, stage_output
from omnisphere_release.operators.window import estimate_minutes

TOUCHED_TABLE = re.compile(
    r"\b(?:ALTER\s+TABLE(?:\s+IF\s+EXISTS)?(?:\s+ONLY)?|INSERT\s+INTO|UPDATE|DELETE\s+FROM|TRUNCATE(?:\s+TABLE)?)"
    r"\s+((?:\"[^\"]+\"|\w+)(?:\.(?:\"[^\"]+\"|\w+))?)", re.IGNORECASE)


def touched_tables(sql_texts: list[str]) -> list[str]:
    """Return the tables that migration SQL alters or writes, in first-seen order."""
    seen: list[str] = []
    for text in sql_texts:
        for match in TOUCHED_TABLE.finditer(text):
            name = match.group(1).replace('"', "")
            if name.lower() not in {"only", "if"} and name not in seen:
                seen.append(name)
    return seen


def migration_engine(service: Any, catalog: Any, applied_by: str, log: Any) -> MigrationEngine:
    return MigrationEngine(service.name, catalog.migrations_dir(service.name),
                           ServiceDatabaseHook(service.postgres_conn_id).get_conn,
                           EngineSettings.from_catalog(service.migrations), applied_by=applied_by, log=log)


def count_rows(conn: Any, tables: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    with conn, conn.cursor() as cur:
        for table in tables:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", [table])
            if not cur.fetchone()[0]:
                continue  # created by the release itself
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*table.split(".", 1))))
            counts[table] = cur.fetchone()[0]
    return counts


class ReleasePreflightOperator(BaseOperator):
    """Check the migration plan and its lint, the ECS service, the backup destination and the image; record "before".

    Changes nothing. Returns the "before" state that every later stage and every rollback step reads.
    """

    template_fields: Sequence[str] = ("service", "image_tag", "strategy", "migrate", "target_version", "dry_run",
                                      "backup_bucket", "reason", "staging_rehearsed", "environment")

    def __init__(self, *, service: str, image_tag: str, strategy: str, migrate: Any = True,
                 target_version: Any = None, dry_run: Any = False, backup_bucket: str = "", reason: str = "",
                 staging_rehearsed: Any = False, environment: str = "production", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.staging_rehearsed, self.environment = staging_rehearsed, environment
        self.service, self.image_tag, self.strategy = service, image_tag, strategy
        self.migrate, self.target_version, self.dry_run = migrate, target_version, dry_run
        self.backup_bucket, self.reason = backup_bucket, reason

    def execute(self, context: Any) -> dict[str, Any]:
        catalog = load_catalog()
        service = catalog.get(self.service)
        target = as_optional_int(self.target_version)
        self.migrate, self.dry_run = as_bool(self.migrate), as_bool(self.dry_run)
        problems: list[str] = []
        self.log.info("Preflight of the release of %s to image tag %s (%s%s): checking the migration plan, ECS, "
                      "the backup destination; nothing will change.", service.name, self.image_tag, self.strategy,
                      ", dry run" if self.dry_run else "")

        engine = migration_engine(service, catalog, f"dag={self.dag_id} run={context['run_id']}", self.log)
        plan = None
        status = engine.status()
        if status.dirty:
            problems.append(f"schema of {service.name} has a dirty version {status.dirty[0].version}: resolve it first")
        try:
            plan = engine.plan("up", target) if self.migrate else None
        except InvalidMigrationInput as exc:
            problems.append(f"migration plan refused: {exc}")
        if plan is not None:
            self.log.info("Migration plan (the rollback plan is its reverse):\n%s", plan.render())
            problems += [f"lint: {f.describe()}" for f in plan.blocking]

        ecs = EcsDeploymentHook(service.aws_conn_id)
        before_td: dict[str, Any] = {}
        try:
            current = ecs.describe_service(service.ecs.cluster, service.ecs.service)
            before_td = ecs.describe_task_definition(current["taskDefinition"])
            previous_image = image_of(before_td, service.ecs.container)
        except EcsDeploymentError as exc:
            problems.append(str(exc))
            current, previous_image = {}, ""
        if current and any(d.get("rolloutState") == "IN_PROGRESS" for d in current.get("deployments", [])):
            problems.append(f"ECS service {service.ecs.service} has a deployment in progress; wait for it to finish")
        target_image = with_image(previous_image, self.image_tag) if previous_image else ""
        pending = [m.version for m in plan.steps] if plan else []
        if previous_image and target_image == previous_image and not pending:
            problems.append(f"{service.name} already runs {target_image} with no pending migration: nothing to "
                            f"release (a duplicate trigger?)")

        image = self._check_image(service, target_image, problems) if target_image else None

        database = ServiceDatabaseHook(service.postgres_conn_id)
        s3 = _s3_client(service.aws_conn_id)
        try:
            BackupHook(database.connect_kwargs(), s3).check_destination(self.backup_bucket)
        except BackupError as exc:
            problems.append(str(exc))

        window = stage_output(context, WAIT_FOR_WINDOW) or {}
        problems += self._checklist(service, window, s3)

        if problems:
            raise AirflowFailException(
                f"Preflight refused the release of {service.name} to {self.image_tag}; nothing was changed:\n"
                + "\n".join(f"  - {p}" for p in problems))

        tables = touched_tables([m.up.sql for m in plan.steps]) if plan else []
        conn = database.get_conn()
        try:
            row_counts = count_rows(conn, tables)
        finally:
            conn.close()
        before = {
            "service": service.name,
            "image_tag": self.image_tag,
            "strategy": self.strategy,
            "dry_run": bool(self.dry_run),
            "reason": self.reason,
            "previous_task_definition": current["taskDefinition"],
            "previous_image": previous_image,
            "target_image": target_image,
            "target_image_digest": image.digest if image else None,
            "desired_count": current.get("desiredCount"),
            "schema_version": status.current_version,
            "pending_versions": pending,
            "target_version": plan.target_version if plan else status.current_version,
            "plan": plan.render(with_sql=False) if plan else "schema migrations not part of this release",
            "lint": [f.describe() for f in plan.findings] if plan else [],
            "row_counts": row_counts,
            "backup_bucket": self.backup_bucket,
            "window": window,
            "staging_rehearsed": as_bool(self.staging_rehearsed),
        }
        self.log.info(
            "Preflight passed for %s: %s -> %s, schema %d -> %s (%d pending), row counts of %d touched table(s) "
            "recorded. Next: %s.", service.name, previous_image, target_image, status.current_version,
            before["target_version"], len(pending), len(row_counts),
            "nothing (dry run)" if self.dry_run else "backup")
        return before

    def _check_image(self, service: Any, target_image: str, problems: list[str]) -> Any:
        """Refuse an image that is not in its registry, before the backup and the migrations rather than after."""
        check = ImageRegistryHook(service.aws_conn_id).check(target_image)
        if check.problem:
            problems.append(check.problem)
        elif check.checked:
            self.log.info("Image %s is in ECR: digest %s, pushed %s.", target_image, check.digest, check.pushed_at)
        else:
            self.log.info("Image %s is not in ECR: its registry is not checked; ECS will fail the deployment (and "
                          "the release roll back) if it cannot pull it.", target_image)
        return check

    def _checklist(self, service: Any, window: dict[str, Any], s3: Any) -> list[str]:
        """The team's pre-migration checklist, checked by the run itself; return what is not satisfied."""
        problems = []
        rehearsed = as_bool(self.staging_rehearsed)
        self.log.info("Checklist: backup before any change: the backup stage; rollback plan: the migration plan above, "
                      "reversed; staging rehearsal: %s.", "done" if rehearsed else "NOT declared")
        if not rehearsed and self.environment == "production" and window.get("mode") != "now":
            problems.append("the checklist requires a staging rehearsal in production: release the same image on "
                            "staging first, then set param staging_rehearsed (or force with window=now and a reason)")
        if window.get("window_end"):
            end = datetime.fromisoformat(window["window_end"])
            left = (end - datetime.now(timezone.utc)).total_seconds() / 60
            needed, source = estimate_minutes(service, s3, self.backup_bucket, self.log)
            self.log.info("Maintenance window closes at %s: %.0f min left; this release needs about %.1f min (%s).",
                          end.isoformat(), left, needed, source)
            if left < needed:
                problems.append(f"the maintenance window closes at {end.isoformat()} ({left:.0f} min left) and this "
                                f"release needs about {needed:.0f} min ({source}): not starting it; trigger it for "
                                f"the next window")
        elif window.get("mode") == "now":
            self.log.info("Outside the maintenance window by choice: %s", window.get("force_reason"))
        return problems


def _s3_client(aws_conn_id: str | None) -> Any:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=aws_conn_id).get_conn()
