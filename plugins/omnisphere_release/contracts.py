"""What the stages of a release hand each other: the task ids, the shape of each stage's output, and one typed door
(:class:`ReleaseRun`) through which a stage reads what earlier stages of its run recorded.

Outputs stay plain JSON in XCom (the report, the API and the tests read them as such); the TypedDicts give them a
shape the type checker holds every reader to, and a reader never spells a task id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict, cast

if TYPE_CHECKING:
    from airflow.sdk import Context

WAIT_FOR_WINDOW = "wait_for_window"
PREFLIGHT = "preflight"
APPROVE_RELEASE = "approve_release"
BACKUP = "backup"
SCHEMA_UP = "schema_up"
DATA_MIGRATE = "data_migrate"
INTEGRITY_CHECK = "integrity_check"
ECS_DEPLOY = "ecs_deploy"
SMOKE_TEST = "smoke_test"
REGRESSION_TEST = "regression_test"
MONITORING_GATE = "monitoring_gate"
FINALIZE = "finalize"
ROLLBACK_ECS = "rollback_ecs"
ROLLBACK_SCHEMA = "rollback_schema"
RESTORE_BACKUP = "restore_backup"
VERIFY_ROLLBACK = "verify_rollback"
RELEASE_FAILED = "release_failed"
REPORT = "report"
MAIN_STAGES = (WAIT_FOR_WINDOW, PREFLIGHT, APPROVE_RELEASE, BACKUP, SCHEMA_UP, DATA_MIGRATE, INTEGRITY_CHECK, ECS_DEPLOY, SMOKE_TEST,
               REGRESSION_TEST, MONITORING_GATE, FINALIZE)
ROLLBACK_STAGES = (ROLLBACK_ECS, ROLLBACK_SCHEMA, RESTORE_BACKUP, VERIFY_ROLLBACK)


class WindowDecision(TypedDict, total=False):
    """wait_for_window: when the release may run, and why (``now`` needs a force_reason)."""

    mode: str  # "window": inside a maintenance window; "forced": outside one, with force_reason
    force_reason: str
    window_start: str  # ISO 8601
    window_end: str | None  # None when forced: no window closes on it
    waited_deferred: bool
    # What the service ran when the release was triggered: preflight refuses if it changed meanwhile (a hotfix
    # released beside a run waiting for its window), so a waiting run never undoes a newer release.
    task_definition_at_trigger: str | None


class ReleasePlan(TypedDict):
    """preflight: the "before" state and the plan; every later stage and every rollback step reads it."""

    service: str
    image_tag: str
    strategy: str
    dry_run: bool
    reason: str
    previous_task_definition: str
    previous_image: str
    target_image: str
    target_image_digest: str | None
    desired_count: int | None
    schema_version: int
    pending_versions: list[int]
    target_version: int
    plan: str
    lint: list[str]
    row_counts: dict[str, int]
    backup_bucket: str
    environment: str
    window: WindowDecision
    fingerprint: dict[str, Any] | None  # checks.Fingerprint.as_dict(): digest and checksums, the evidence's key
    promotion: dict[str, Any] | None  # the promotion rule as applied: the evidence used, or the override
    changes: dict[str, Any]  # checks.changes_of: what this release changes, for the report's "Changes" section
    rehearsal: dict[str, Any] | None  # the rehearsal on a copy of the environment that the window estimate used


class RefusedAnswer(TypedDict):
    """An answer approve_release refused: from someone who may not approve this release (it was then asked again)."""

    by: str | None
    option: str
    at: str  # ISO 8601
    why: str


class ApprovalDecision(TypedDict, total=False):
    """approve_release: whether the release needed an approver, and who answered what, when (four eyes).

    Pushed as the task's return value, also when it fails (rejected, timed out): the report reads it either way."""

    required: bool
    environment: str
    outcome: str  # "not_required", "approved", "rejected", "timed_out", "no_approver", "plan_changed" (approved, but
    # the service changed while the request waited, or another operation holds it now)
    triggered_by: str | None
    approvers: list[str]  # who may answer: the service's approvers, less the person who triggered the run
    approved_by: str | None
    approved_at: str | None  # ISO 8601
    rejected_by: str | None
    rejected_at: str | None
    comment: str
    deadline: str | None  # ISO 8601: when the request times out
    refused_answers: list[RefusedAnswer]
    link: str | None  # the task's Required Actions page in the Airflow UI


class BackupOutput(TypedDict):
    """backup: where the dump is and how to trust it (hooks.backups.BackupRecord.to_dict)."""

    bucket: str
    key: str
    uri: str
    sha256: str
    size_bytes: int
    dump_seconds: float
    upload_seconds: float
    objects: int


class DeploymentOutput(TypedDict, total=False):
    """ecs_deploy: the deployment this run started, and how it ended."""

    deployment_arn: str
    task_definition: str
    configuration: dict[str, Any]
    # Canary and linear in steps: {"percent", "bake_minutes"} each, watched one by one by monitoring_gate; [] else.
    steps: list[dict[str, Any]]
    # Blue/green held at ECS's test-traffic hook: the SSM parameter smoke_test answers it in; None else.
    test_traffic_hook: str | None
    deployment_status: str
    summary: str
    # Canary and linear in steps: the first share of traffic on the new revision came after this (epoch seconds).
    first_share_after: float


class DataMigrationOutcome(TypedDict):
    """data_migrate: one data migration as it ended in this run."""

    name: str
    direction: str
    state: str
    rows: int
    batches: int
    seconds: float
    reversible: bool


class ReleaseRun:
    """Read what earlier stages of this run returned, typed; None (or empty) when a stage returned nothing
    (it failed, was skipped, or has not run)."""

    def __init__(self, context: Context) -> None:
        self.ti = context["ti"]

    def output(self, task_id: str) -> Any:
        return self.ti.xcom_pull(task_ids=task_id)

    @property
    def window(self) -> WindowDecision:
        return cast("WindowDecision", self.output(WAIT_FOR_WINDOW) or {})

    @property
    def plan(self) -> ReleasePlan | None:
        return cast("ReleasePlan | None", self.output(PREFLIGHT))

    @property
    def approval(self) -> ApprovalDecision:
        return cast("ApprovalDecision", self.output(APPROVE_RELEASE) or {})

    @property
    def backup(self) -> BackupOutput | None:
        return cast("BackupOutput | None", self.output(BACKUP))

    @property
    def deployment(self) -> DeploymentOutput:
        return cast("DeploymentOutput", self.output(ECS_DEPLOY) or {})

    @property
    def data_migrations(self) -> list[DataMigrationOutcome]:
        return list((self.output(DATA_MIGRATE) or {}).get("migrations", []))

    def task_states(self) -> dict[str, str]:
        """Return the state of every task of this run, by task id (``none`` for tasks not yet run)."""
        states = self.ti.get_task_states(dag_id=self.ti.dag_id, run_ids=[self.ti.run_id])
        per_run = states.get(self.ti.run_id, states) if isinstance(states, dict) else {}
        return {task_id: str(state or "none") for task_id, state in per_run.items()}


def failed_stages(states: dict[str, str]) -> list[str]:
    return [stage for stage in MAIN_STAGES if states.get(stage) == "failed"]
