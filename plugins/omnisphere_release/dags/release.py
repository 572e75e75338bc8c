"""The factory of ``release_<service>``: the stages of a release and its rollback branch, wired once for every service.

```
wait_for_window > preflight > approve_release > backup > schema_up > integrity_check > ecs_deploy > smoke_test
    > regression_test > monitoring_gate > finalize
                 any failure from backup on > rollback_ecs > rollback_schema > restore_backup > verify_rollback
                 release_failed (fails the run whenever a stage failed)        report (always)
```

Each stage returns what it changed; each rollback step reads that (or the "before" state preflight recorded) and
undoes exactly it, and does nothing when there is nothing to undo, so every step can run twice.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param, TriggerRule

from omnisphere_release import contracts as stage
from omnisphere_release.catalog import Catalog, Service
from omnisphere_release.checks import WINDOW_PATTERN, schedule_of
from omnisphere_release.notifications import release_callbacks
from omnisphere_release.operators.approval import ReleaseApprovalOperator
from omnisphere_release.operators.backup import PostgresBackupToS3Operator, PostgresRestoreFromS3Operator
from omnisphere_release.operators.common import ENVIRONMENT_TEMPLATE
from omnisphere_release.operators.datamigrate import PostgresDataMigrateOperator
from omnisphere_release.operators.ecs import EcsDeployServiceOperator, EcsRollbackServiceOperator
from omnisphere_release.operators.finalize import ReleaseFinalizeOperator, VerifyRollbackOperator
from omnisphere_release.operators.integrity import PostgresIntegrityCheckOperator
from omnisphere_release.operators.migrations import (
    PostgresApplyMigrationsOperator,
    PostgresRevertReleaseMigrationsOperator,
)
from omnisphere_release.operators.monitoring import CloudWatchMonitoringGateOperator
from omnisphere_release.operators.preflight import ReleasePreflightOperator
from omnisphere_release.operators.regression import EcsRegressionTestOperator
from omnisphere_release.operators.report import ReleaseFailedOperator, ReleaseReportOperator
from omnisphere_release.operators.smoke import HttpSmokeTestOperator
from omnisphere_release.operators.window import WaitForMaintenanceWindowOperator
from omnisphere_release.params import IMAGE_TAG_PATTERN, IMAGE_TAG_RULE, optional_text

STRATEGIES = ["rolling", "blue_green", "canary", "linear"]
MAX_BAKE_MINUTES = 24 * 60
# One traffic step of a run's steps param; the rule across steps (rising to 100, a shape ECS runs) is
# hooks.ecs.steps_problem, checked by ecs_deploy before anything is deployed.
STEP_SCHEMA = {"type": "object", "required": ["percent", "bake_minutes"], "additionalProperties": False,
               "properties": {"percent": {"type": "integer", "minimum": 1, "maximum": 100},
                              "bake_minutes": {"type": "number", "minimum": 0, "maximum": MAX_BAKE_MINUTES}}}
# Every task is bounded: a stage that hangs (a lock never granted, a dump that stalls) fails and rolls back instead
# of holding the service's one release slot for ever. Stages bound by the catalog get that bound, plus a margin.
DATABASE_STAGE_TIMEOUT = timedelta(hours=3)  # pg_dump, migrations, restore: the longest expected, with room
DATA_MIGRATION_TIMEOUT = timedelta(hours=12)  # resumable: a retry goes on from its checkpoint
SHORT_STAGE_TIMEOUT = timedelta(minutes=30)  # preflight, checks, verification, report


def environment_param(catalog: Catalog) -> Param:
    """The run's environment: which databases, cluster and backup bucket it acts on, and which rules apply."""
    rules = {e.name: ", ".join(r for r in (f"needs evidence from {e.promote_from}" if e.promote_from else "",
                                           "needs an approver" if e.approval else "") if r) or "no promotion rule"
             for e in catalog.environments}
    return Param(catalog.default_environment, type="string", enum=catalog.environment_names, title="Environment",
                 description="Where to act: " + "; ".join(f"{name} ({rule})" for name, rule in rules.items()) + ".")


def release_params(service: Service, catalog: Catalog) -> dict[str, Param]:
    # Titles and descriptions are what the UI's trigger form shows; the keys are what the API and the CLI send.
    return {
        "image_tag": Param(type="string", pattern=IMAGE_TAG_PATTERN, title="Image tag",
                           description="The tag of the image to release, from the same repository as the running "
                                       f"image: {IMAGE_TAG_RULE}."),
        "strategy": Param(service.deploy.strategy, type="string", enum=STRATEGIES, title="Strategy",
                          description="ECS deployment strategy; rolling uses the circuit breaker."),
        # After the strategy: the UI form shows the params in this order (and the UI test picks the first select).
        "environment": environment_param(catalog),
        "migrate": Param(True, type="boolean", title="Apply migrations",
                         description="Apply pending schema migrations before deploying."),
        "target_version": Param(None, type=["null", "integer"], minimum=0, title="Target schema version",
                                description="Apply migrations up to this version (default: all pending)."),
        "bake_minutes": Param(service.deploy.bake_minutes, type="number", minimum=0, maximum=MAX_BAKE_MINUTES,
                              title="Bake minutes",
                              description="How long the monitoring gate watches the new version."),
        "steps": Param(None, type=["null", "array"], minItems=1, items=STEP_SCHEMA, title="Traffic steps",
                       description="Canary and linear: the traffic steps of this run, each baked and analysed before "
                                   "the next, e.g. [{\"percent\": 10, \"bake_minutes\": 5}, {\"percent\": 100, "
                                   "\"bake_minutes\": 10}] (canary: [p, 100]; linear: equal shares, e.g. 25, 50, 75, "
                                   "100). Empty: the catalog's deploy.steps"
                                   + (f" ({', '.join(f'{s.percent} %' for s in service.deploy.steps)})"
                                      if service.deploy.steps else "") + "."),
        "restore_policy": Param("when_needed", type="string", enum=["when_needed", "always"], title="Restore policy",
                                description="Restore the backup on rollback only when the schema cannot be rolled "
                                            "back by its down files, or always."),
        "window": Param("next", type="string", pattern=WINDOW_PATTERN, title="Window",
                        description="next: wait for the service's maintenance window "
                                    f"({schedule_of(service).summary()}); an ISO 8601 start time; or now "
                                    "(needs force_reason)."),
        "force_reason": optional_text("Why this release cannot wait for its window (required with window=now).",
                                      title="Force reason"),
        "evidence_override": optional_text(
            "Release without the promotion evidence the environment requires (a successful release of the same image "
            "where it is promoted from), for this reason: kept in the plan, the report and the evidence record; an "
            "approver must accept it where the environment requires one.", title="Evidence override"),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="Run preflight only: print the plan, change nothing."),
        "reason": optional_text("Why this release; kept in the report.", title="Reason"),
    }


def doc_for(service: Service) -> str:
    return f"""
### release_{service.name}

Releases **{service.name}** ({service.description}) to a new image: back up the database, apply the schema
migrations, check data integrity, deploy to ECS ({service.ecs.cluster}/{service.ecs.service}), smoke-test, run the
regression suite ({service.regression.task_definition if service.regression else 'none configured'}) as a one-off ECS task, watch
CloudWatch for the bake period, finalize. Where the environment requires four eyes, the release first waits at
`approve_release` for one of {', '.join(service.approvers) or '(no approver: add approvers to the catalog)'}, never
the person who triggered it; a rejection or no answer in time ends the run failed, with nothing changed.
On any failure after approval, the rollback branch undoes what this run
did, in reverse: `rollback_ecs`, `rollback_schema`, `restore_backup` (only when needed, or always by policy),
`verify_rollback`; then `release_failed` fails the run. `report` writes the release report whatever happens.

Default strategy `{service.deploy.strategy}`, bake {service.deploy.bake_minutes} min, deploy timeout
{service.deploy.timeout_minutes} min. Owner team: {service.team or 'platform'}.
"""


def build_release_dag(service: Service, catalog: Catalog, has_data_migrations: bool = False) -> DAG:
    name = service.name
    # The team's news (notifications.py): started from preflight, awaiting approval from approve_release, the outcome
    # from the DAG's callbacks; every task keeps the first line of its error for the outcome's message.
    news = release_callbacks(service)
    with DAG(
        dag_id=f"release_{name}",
        description=f"Back up, migrate, check, deploy, smoke-test and watch {name}, with automatic rollback",
        doc_md=doc_for(service),
        schedule=None,
        catchup=False,
        # Several runs may exist: a forced hotfix must not queue behind a release waiting days for its window. They
        # never act at once (the service's lease), and a waiting run is re-checked by its preflight when it wakes.
        max_active_runs=5,
        # Templates render as text: native rendering would turn an image tag like 1.10 into the float 1.1.
        render_template_as_native_obj=False,
        tags=["omnisphere", "release", name],
        params=release_params(service, catalog),
        default_args={"environment": ENVIRONMENT_TEMPLATE, "owner": service.team or "platform", "retries": 1, "retry_delay": timedelta(seconds=20),
                      "execution_timeout": SHORT_STAGE_TIMEOUT, **news.default_args},
        **news.dag,
    ) as dag:
        deploy_timeout = timedelta(minutes=service.deploy.timeout_minutes + 10)
        # No timeout: it waits, deferred and holding no worker slot, for a window that may be days away.
        wait = WaitForMaintenanceWindowOperator(task_id=stage.WAIT_FOR_WINDOW, service=name,
                                                window="{{ params.window }}", force_reason="{{ params.force_reason or '' }}",
                                                retries=0, execution_timeout=None)
        preflight = ReleasePreflightOperator(
            task_id=stage.PREFLIGHT, service=name, image_tag="{{ params.image_tag }}",
            strategy="{{ params.strategy }}", migrate="{{ params.migrate }}",
            target_version="{{ params.target_version }}", dry_run="{{ params.dry_run }}",
            reason="{{ params.reason or '' }}", **news.preflight)
        # Passes at once unless the environment requires four eyes; then it waits, holding no worker slot, up to the
        # catalog's approval_timeout_hours. A rejection or a timeout fails it: the run ends failed, nothing changed.
        approve = ReleaseApprovalOperator(task_id=stage.APPROVE_RELEASE, service=name, retries=0, **news.approval)
        backup = PostgresBackupToS3Operator(task_id=stage.BACKUP, service=name,
                                            execution_timeout=DATABASE_STAGE_TIMEOUT)
        schema_up = PostgresApplyMigrationsOperator(
            task_id=stage.SCHEMA_UP, service=name, direction="up",
            target_version=f"{{{{ ti.xcom_pull(task_ids='{stage.PREFLIGHT}')['target_version'] }}}}", dry_run=False,
            reason="{{ 'release ' ~ params.image_tag ~ ': ' ~ (params.reason or '') }}", retries=0,
            execution_timeout=DATABASE_STAGE_TIMEOUT)
        data_migrate = (PostgresDataMigrateOperator(task_id=stage.DATA_MIGRATE, service=name, retries=3,
                                                    execution_timeout=DATA_MIGRATION_TIMEOUT)
                        if has_data_migrations else None)
        integrity = PostgresIntegrityCheckOperator(task_id=stage.INTEGRITY_CHECK, service=name, retries=0)
        deploy = EcsDeployServiceOperator(task_id=stage.ECS_DEPLOY, service=name, strategy="{{ params.strategy }}",
                                          bake_minutes="{{ params.bake_minutes }}",
                                          steps="{{ params.steps | tojson }}", execution_timeout=deploy_timeout)
        smoke = HttpSmokeTestOperator(task_id=stage.SMOKE_TEST, service=name, retries=0)
        # Bounded by the suite's own limit (catalog regression.timeout_minutes), plus a margin for starting it. A
        # retry reattaches to the suite its run started; a failed suite is final (AirflowFailException).
        regression = EcsRegressionTestOperator(
            task_id=stage.REGRESSION_TEST, service=name,
            execution_timeout=timedelta(minutes=service.regression.timeout_minutes + 10) if service.regression
            else SHORT_STAGE_TIMEOUT)
        gate = CloudWatchMonitoringGateOperator(task_id=stage.MONITORING_GATE, service=name,
                                                bake_minutes="{{ params.bake_minutes }}", retries=0,
                                                execution_timeout=timedelta(minutes=MAX_BAKE_MINUTES + 30))
        finalize = ReleaseFinalizeOperator(task_id=stage.FINALIZE, service=name, execution_timeout=deploy_timeout)
        main = [t for t in (wait, preflight, approve, backup, schema_up, data_migrate, integrity, deploy, smoke, regression, gate,
                                finalize) if t]
        for upstream, downstream in zip(main, main[1:], strict=False):
            upstream >> downstream

        rollback_ecs = EcsRollbackServiceOperator(task_id=stage.ROLLBACK_ECS, service=name,
                                                  trigger_rule=TriggerRule.ONE_FAILED,
                                                  execution_timeout=2 * deploy_timeout)  # stop, then redeploy
        rollback_schema = PostgresRevertReleaseMigrationsOperator(task_id=stage.ROLLBACK_SCHEMA, service=name,
                                                                  execution_timeout=DATABASE_STAGE_TIMEOUT)
        restore = PostgresRestoreFromS3Operator(task_id=stage.RESTORE_BACKUP, service=name,
                                                restore_policy="{{ params.restore_policy }}",
                                                trigger_rule=TriggerRule.ALL_DONE,
                                                execution_timeout=DATABASE_STAGE_TIMEOUT)
        verify = VerifyRollbackOperator(task_id=stage.VERIFY_ROLLBACK, service=name, trigger_rule=TriggerRule.ALL_DONE)
        main[3:] >> rollback_ecs  # from backup on: what preflight and approve_release refuse has changed nothing
        rollback_ecs >> rollback_schema >> restore >> verify

        # Two leaves: the run is FAILED whenever release_failed fails, whatever the report does.
        failed = ReleaseFailedOperator(task_id=stage.RELEASE_FAILED, trigger_rule=TriggerRule.ALL_DONE, retries=0)
        report = ReleaseReportOperator(task_id=stage.REPORT, service=name, trigger_rule=TriggerRule.ALL_DONE)
        [finalize, verify] >> failed
        [finalize, verify] >> report
    return dag
