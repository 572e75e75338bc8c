"""preflight: validate everything that can be validated before anything changes, and record the "before" state.

In an environment with ``promote_from`` (production), preflight also applies the promotion rule
(checks.promotion_verdict): it names the evidence it found in the evidence store (hooks/evidence.py) or says exactly
what is missing. An ``evidence_override`` (a reason) overrides a missing evidence: preflight then logs the override
loudly and records it
in the plan, the report and the evidence record, and the run still waits for an approver where the environment
requires one (approve_release, after preflight): an override is a decision two people take and that stays on record.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from omnisphere_release import checks
from omnisphere_release.catalog import Catalog, Environment, Service, load_catalog
from omnisphere_release.contracts import ReleasePlan, ReleaseRun, WindowDecision
from omnisphere_release.datamigrate import discover_specs
from omnisphere_release.hooks.backups import BackupError, BackupHook
from omnisphere_release.hooks.ecs import EcsDeploymentError
from omnisphere_release.hooks.evidence import EvidenceStoreHook, evidence_bucket
from omnisphere_release.hooks.postgres import ServiceDatabaseHook, schema_engine
from omnisphere_release.hooks.reports import ReleaseReportStoreHook
from omnisphere_release.migrations import InvalidMigrationInput, Plan
from omnisphere_release.migrations.engine import version_label
from omnisphere_release.operators.common import (
    as_bool,
    as_optional_int,
    backup_bucket_of,
    hold_service,
    run_label,
)

TOUCHED_TABLE = re.compile(
    r"\b(?:ALTER\s+TABLE(?:\s+IF\s+EXISTS)?(?:\s+ONLY)?|INSERT\s+INTO|UPDATE|DELETE\s+FROM|TRUNCATE(?:\s+TABLE)?)"
    r"\s+((?:\"[^\"]+\"|\w+)(?:\.(?:\"[^\"]+\"|\w+))?)", re.IGNORECASE)
# The run's evidence_override param: a reason of its own, not the window's force_reason, so that forcing a window (a
# hotfix at noon, or release_all's scheduled train) never skips the promotion rule by the way.
EVIDENCE_OVERRIDE_TEMPLATE = "{{ params.get('evidence_override') or '' }}"


def touched_tables(sql_texts: list[str]) -> list[str]:
    """Return the tables that migration SQL alters or writes, in first-seen order."""
    seen: list[str] = []
    for text in sql_texts:
        for match in TOUCHED_TABLE.finditer(text):
            name = match.group(1).replace('"', "")
            if name.lower() not in {"only", "if"} and name not in seen:
                seen.append(name)
    return seen


class ReleasePreflightOperator(BaseOperator):
    """Check the migration plan and its lint, the ECS service, the backup destination and the image; record "before".

    Changes nothing. Returns the "before" state (:class:`ReleasePlan`) that every later stage and rollback step reads.
    """

    template_fields: Sequence[str] = ("service", "environment", "image_tag", "strategy", "migrate", "target_version",
                                      "plan_only", "backup_bucket", "reason", "evidence_override")

    def __init__(self, *, service: str, image_tag: str, strategy: str, migrate: Any = True,
                 target_version: Any = None, dry_run: Any = False, backup_bucket: str = "", reason: str = "",
                 evidence_override: str = EVIDENCE_OVERRIDE_TEMPLATE, environment: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.environment, self.evidence_override = environment, evidence_override
        self.service, self.image_tag, self.strategy = service, image_tag, strategy
        # Not self.dry_run: that is BaseOperator's own method.
        self.migrate, self.target_version, self.plan_only = migrate, target_version, dry_run
        self.backup_bucket, self.reason = backup_bucket, reason

    def execute(self, context: Context) -> ReleasePlan:
        catalog = load_catalog()
        service = catalog.get(self.service, self.environment)
        environment = catalog.environment(self.environment)
        self.environment = environment.name  # "" (no param) means the default environment: say which
        self.backup_bucket = self.backup_bucket or backup_bucket_of(environment)
        migrate, dry_run = as_bool(self.migrate), as_bool(self.plan_only)
        problems: list[str] = []
        self.log.info("Preflight of the release of %s to image tag %s in %s (%s%s): checking the migration plan, ECS "
                      "(cluster %s), the backup destination; nothing will change.", service.name, self.image_tag,
                      environment.name, self.strategy, ", dry run" if dry_run else "", service.ecs.cluster)
        if not dry_run:  # a dry run changes nothing, so it holds nothing either
            hold_service(context, service, f"release of {service.name} to {self.image_tag}", self.log)

        engine = schema_engine(service, catalog, run_label(self.dag_id, context["run_id"]), self.log)
        status = engine.status()
        if status.dirty:
            problems.append(f"schema of {service.name} has a dirty version {status.dirty[0].version}: resolve it first")
        plan: Plan | None = None
        try:
            plan = engine.plan("up", as_optional_int(self.target_version)) if migrate else None
        except InvalidMigrationInput as exc:
            problems.append(f"migration plan refused: {exc}")
        if plan is not None:
            self.log.info("Migration plan (the rollback plan is its reverse):\n%s", plan.render())
            problems += [f"lint: {f.describe()}" for f in plan.blocking]
        pending = [m.version for m in plan.steps] if plan else []

        window = ReleaseRun(context).window
        target = None
        try:
            target = checks.target_image(service, self.image_tag)
        except EcsDeploymentError as exc:
            problems.append(str(exc))
        if target:
            if target.live.deploying:
                problems.append(f"ECS service {service.ecs.service} has a deployment in progress; wait for it to "
                                f"finish")
            if target.already_running and not pending:
                problems.append(f"{service.name} already runs {target.image} ({target.running_image}) with no "
                                f"pending migration: nothing to "
                                f"release (a duplicate trigger?)")
            was = window.get("task_definition_at_trigger")
            if was and was != target.running_task_definition:
                problems.append(f"{service.name} changed since this release was triggered: it ran {was} then and "
                                f"runs {target.running_task_definition} now (a hotfix or another release went first): "
                                f"trigger this release again if it is still wanted")
            if target.problem:
                problems.append(target.problem)
            else:
                self.log.info("Target: %s.", target.describe())

        backups = BackupHook.for_service(service)
        try:
            backups.check_destination(self.backup_bucket)
        except BackupError as exc:
            problems.append(str(exc))

        fingerprint = None
        try:
            fingerprint = checks.fingerprint(catalog, service.name, target.registry.digest if target else None,
                                             plan.target_version if plan else status.current_version)
        except InvalidMigrationInput as exc:
            problems.append(f"cannot fingerprint the release for its evidence: {exc}")
        promotion = None
        if fingerprint is not None and target is not None and environment.promote_from:
            promotion, refusal = self._promotion(catalog, service, environment, fingerprint)
            problems += refusal

        rehearsal = self._rehearsal(catalog, service, environment, pending)
        problems += self._checklist(service, window, rehearsal)

        if problems or target is None:
            raise AirflowFailException(
                f"Preflight refused the release of {service.name} to {self.image_tag}; nothing was changed:\n"
                + "\n".join(f"  - {p}" for p in problems))

        row_counts = ServiceDatabaseHook(service.postgres_conn_id).count_rows(
            touched_tables([m.up.sql for m in plan.steps]) if plan else [])
        before: ReleasePlan = {
            "service": service.name,
            "environment": environment.name,
            "image_tag": self.image_tag,
            "strategy": self.strategy,
            "dry_run": dry_run,
            "reason": checks.plain_text(self.reason),
            "previous_task_definition": target.running_task_definition,
            "previous_image": target.running_image,
            "target_image": target.image,
            "target_image_digest": target.registry.digest,
            "desired_count": target.live.service.get("desiredCount"),
            "schema_version": status.current_version,
            "pending_versions": pending,
            "target_version": plan.target_version if plan else status.current_version,
            "plan": plan.render(with_sql=False) if plan else "schema migrations not part of this release",
            "lint": [f.describe() for f in plan.findings] if plan else [],
            "row_counts": row_counts,
            "backup_bucket": self.backup_bucket,
            "window": window,
            "fingerprint": fingerprint.as_dict() if fingerprint else None,
            "promotion": promotion,
            "changes": checks.changes_of(plan.steps if plan else [], self._data_specs(catalog, service),
                                         target.running_image, target.image, target.registry.digest,
                                         checks.plain_text(self.reason)),
            "rehearsal": ({"run_id": rehearsal.get("run_id"), "environment": rehearsal.get("environment"),
                           "generated_at": rehearsal.get("generated_at"),
                           "release_minutes": rehearsal.get("release_minutes"),
                           "heaviest_lock": next(iter((rehearsal.get("migrations") or {}).get("locks") or []), None)}
                          if rehearsal else None),
        }
        self.log.info(
            "Preflight passed for %s: %s -> %s, schema %s -> %s (%d pending), row counts of %d touched table(s) "
            "recorded. Next: %s.", service.name, target.running_image, target.image, version_label(status.current_version),
            version_label(before["target_version"]), len(pending), len(row_counts), "nothing (dry run)" if dry_run else "backup")
        return before

    def _promotion(self, catalog: Catalog, service: Service, environment: Environment,
                   fingerprint: checks.Fingerprint) -> tuple[dict[str, Any], list[str]]:
        """Apply the promotion rule; return what the plan records of it, and the problems that refuse the release
        (none when the evidence is there, or when an evidence_override overrides it)."""
        source = str(environment.promote_from)
        verdict = checks.promotion_evidence(catalog, service, environment, fingerprint, self.image_tag)
        record: dict[str, Any] = {"rule": f"a successful {source} release of the same image digest and checksums, "
                                          f"at most {environment.evidence_max_age_hours:g} h old",
                                  "promote_from": source, "evidence": verdict.evidence, "problems": verdict.problems,
                                  "overridden": False, "override_reason": ""}
        if verdict.satisfied:
            self.log.info("Promotion to %s: %s.", environment.name, verdict.describe())
            return record, []
        reason = checks.plain_text(self.evidence_override)
        if not reason:
            self.log.warning("Promotion to %s refused: %s", environment.name, verdict.describe())
            return record, [f"promotion to {environment.name} needs evidence from {source}: {p}"
                            for p in verdict.problems] + [
                "to release without it, give param evidence_override (why)"
                + (" (an approver must then accept it)" if environment.approval else "")]
        self.log.warning("!" * 100)
        self.log.warning("PROMOTION RULE OVERRIDDEN for %s in %s, because: %s", service.name, environment.name, reason)
        for problem in verdict.problems:
            self.log.warning("  missing evidence: %s", problem)
        self.log.warning("The override is recorded in the plan, the report and the evidence record%s.",
                         "; approve_release asks an approver to accept it" if environment.approval else "")
        self.log.warning("!" * 100)
        return {**record, "overridden": True, "override_reason": reason}, []

    def _rehearsal(self, catalog: Catalog, service: Service, environment: Environment,
                   pending: list[int]) -> dict[str, Any] | None:
        """The newest passed rehearsal of exactly these pending migrations on a copy of this environment, if any."""
        if not pending:
            return None
        try:
            found = checks.rehearsal_for(EvidenceStoreHook(aws_conn_id=service.aws_conn_id).rehearsals(
                evidence_bucket(catalog), service.name, environment.name), pending)
        except Exception as exc:  # noqa: BLE001 - no rehearsal is an estimate from history, never a refusal
            self.log.warning("Could not read the rehearsals of %s: %s", service.name, exc)
            return None
        if found:
            self.log.info("Rehearsed on a copy of %s by %s (%s): migrations and data migrations took %.1f min; "
                          "heaviest lock: %s.", environment.name, found.get("run_id"), found.get("generated_at"),
                          float(found.get("release_minutes") or 0),
                          next((f"{lock['mode']} on {lock['relation']}" for lock in
                                (found.get("migrations") or {}).get("locks") or []), "none"))
        else:
            self.log.info("No rehearsal of migrations %s on a copy of %s (rehearse_%s): the window estimate comes "
                          "from earlier releases.", pending, environment.name, service.name)
        return found

    @staticmethod
    def _data_specs(catalog: Catalog, service: Service) -> list[Any]:
        try:
            return discover_specs(catalog.sql_dir / service.name / "data")
        except InvalidMigrationInput:
            return []  # data_migrate refuses a broken spec itself, naming it

    def _checklist(self, service: Service, window: WindowDecision,
                   rehearsal: dict[str, Any] | None = None) -> list[str]:
        """The team's pre-migration checklist, checked by the run itself; return what is not satisfied."""
        self.log.info("Checklist: backup before any change: the backup stage; rollback plan: the migration plan above, "
                      "reversed; tested in staging first: the promotion rule above, where the environment has one.")
        problems: list[str] = []
        if window.get("window_end"):
            needed = self._estimate(service, rehearsal)
            now = datetime.now(timezone.utc)
            left = (datetime.fromisoformat(str(window["window_end"])) - now).total_seconds() / 60
            self.log.info("Maintenance window closes at %s: %.0f min left; this release needs about %.1f min (%s).",
                          window["window_end"], left, needed.minutes, needed.source)
            room = checks.window_room_problem(window, needed, now)
            if room:
                problems.append(room)
        elif window.get("mode") == "forced":
            self.log.info("Outside the maintenance window by choice: %s", window.get("force_reason"))
        return problems

    def _estimate(self, service: Service, rehearsal: dict[str, Any] | None = None) -> checks.DurationEstimate:
        try:
            reports = ReleaseReportStoreHook(aws_conn_id=service.aws_conn_id).recent_reports(self.backup_bucket,
                                                                                             service.name)
        except Exception as exc:  # noqa: BLE001 - any failure to read history falls back to the catalog's estimate
            self.log.warning("Could not read earlier release reports for an estimate: %s", exc)
            reports = []
        return checks.estimate_duration(service, reports, rehearsal=rehearsal)
