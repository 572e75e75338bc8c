"""The factory of the ``schema_migrations`` DAG: run the migration engine for one service or all of them.

``all`` runs one mapped task per service, in waves that follow the catalog's ``depends_on`` (a service migrates
after the services it depends on; ``down`` runs the waves in reverse), and the ``omnisphere_migrations`` pool bounds how
many migrate at once. The number of waves is the depth of the dependency graph, known when the DAG is parsed.

In production each service's task waits for that service's own maintenance window (operators/standalone.py): the
services' windows need not overlap (auth-service's is on Sunday, billing-service's on Tuesday), so waiting for one
moment when a whole wave, or all of them, is inside a window could wait for ever. Waiting per service keeps both rules:
every database changes inside its window, and no wave starts before the one it depends on has finished. The run may
then take days; it holds every service it migrates from check_params on, so nobody changes a service a later wave
depends on meanwhile. A fixed time (``now``, or an ISO 8601 start, outside a window only with a ``force_reason``)
starts the first wave then, and the later waves follow it back to back.

``action=baseline`` or ``adopt`` records, for one service, the versions its database already has (a database built by
``run-migrations.sh`` / golang-migrate) without running them: the engine's ``baseline`` / ``adopt``, in the task
``record_baseline``, under the same lease. It touches only the engine's bookkeeping tables, so it needs no window
and no backup; the waves are skipped.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, cast

from airflow.sdk import DAG, Context, Param, TriggerRule, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from omnisphere_release.catalog import Catalog
from omnisphere_release.checks import WINDOW_PATTERN, plain_text, schedule_of, unknown_conf_problem
from omnisphere_release.dags.release import environment_param
from omnisphere_release.hooks.postgres import schema_engine
from omnisphere_release.migrations import InvalidMigrationInput
from omnisphere_release.migrations.engine import GOLANG_MIGRATE_TABLE, NOTHING_APPLIED
from omnisphere_release.operators.common import ENVIRONMENT_TEMPLATE, hold_service, run_label
from omnisphere_release.operators.standalone import (
    GUARD_TEMPLATES,
    StandaloneApplyMigrationsOperator,
    check_backup_bucket,
    production_window,
)
from omnisphere_release.params import optional_text

MIGRATIONS_POOL = "omnisphere_migrations"
ACTIONS = ("migrate", "baseline", "adopt")

DOC_MD = """
### schema_migrations

Applies (`up`) or reverts (`down`) the schema migrations of one OmniSphere service, or of `all` of them in
`depends_on` order (reverse order for `down`). Replaces `run-migrations.sh <service|all> <up|down>`.

* **dry_run** is on by default: the run prints the plan (files, SQL, lint findings) and changes nothing.
  Turn it off, and give a **reason**, to apply.
* **target_version**: `up` applies up to it (default: the latest); `down` reverts every version above it and keeps
  it (default: the last one only). **revert_all** with `down` reverts everything, version 0 included.
  Only with a single service.
* **action** `baseline` (with **target_version**) or `adopt` (reads golang-migrate's `schema_migrations` table;
  refused if dirty): record the versions an existing database already has as applied, without running them. One
  service, a **reason**, and `dry_run` off to record; refused if the history disagrees. See the runbook's
  "Adopting an existing service".
* A file changed after it was applied is refused (drift) unless **acknowledge_drift** says why.
* In production (param **environment**, an environment the catalog marks `production`), a change also waits for each service's maintenance window
  (**window** `next`; or an ISO 8601 start; outside a window, or `now`, only with a **force_reason**) and backs the
  service's database up to S3 (`<service>/<run id>/schema_migrations.dump`, sha256-tagged, verified) just before
  changing it. With `all` and `next`, each service waits for its own window, wave after wave: the run can take days.
  A dry run, and a service with nothing to change, wait for nothing and need no backup.
* Each task log says what was applied, in what time, from which version to which, and where the backup is.
"""


def dependency_levels(catalog: Catalog) -> dict[str, int]:
    """Return each service's depth in the depends_on graph (0 for services that depend on nothing)."""
    levels: dict[str, int] = {}
    for service in catalog.release_order():
        levels[service.name] = 1 + max((levels[d] for d in service.depends_on), default=-1)
    return levels


def action_problem(params: dict[str, Any]) -> str | None:
    """Say which params contradict the action (or revert_all), or None when they fit."""
    action = params.get("action", "migrate")
    if params.get("revert_all") and (action != "migrate" or params.get("direction") != "down"
                                     or params.get("target_version") is not None):
        return ("param 'revert_all' goes with action 'migrate', direction 'down' and no target_version: it reverts "
                "every applied version")
    if action == "migrate":
        return None
    if params.get("service") == "all":
        return f"action '{action}' needs a single service: each database is adopted at its own version"
    if not plain_text(params.get("reason")):
        return f"param 'reason' is required by action '{action}': say how you know what the database has"
    if action == "baseline" and params.get("target_version") is None:
        return "action 'baseline' needs param 'target_version': the newest version the database already has"
    if action == "adopt" and params.get("target_version") is not None:
        return "action 'adopt' reads the version from golang-migrate's table: leave 'target_version' empty"
    return None


def build_schema_migrations_dag(catalog: Catalog, dag_id: str = "schema_migrations") -> DAG:
    levels = dependency_levels(catalog)
    wave_count = max(levels.values()) + 1
    names = catalog.names
    windows = "; ".join(f"{s.name} {schedule_of(s).summary()}" for s in catalog.services)
    dag_params = {
        "environment": environment_param(catalog),
        "service": Param("all", type="string", enum=["all", *names],
                         description="The service to migrate, or all of them in dependency order."),
        "direction": Param("up", type="string", enum=["up", "down"]),
        "target_version": Param(None, type=["null", "integer"], minimum=0,
                                description="up: apply up to this version; down: revert every version above it."),
        "action": Param("migrate", type="string", enum=list(ACTIONS),
                        description="migrate: up or down. baseline: record versions <= target_version as applied "
                                    "without running them. adopt: the same at the version of golang-migrate's "
                                    "schema_migrations table."),
        "revert_all": Param(False, type="boolean",
                            description="down only: revert every applied version, version 0 included."),
        "dry_run": Param(True, type="boolean",
                         description="Print the plan and change nothing. Applying is a choice: turn it off."),
        "reason": optional_text("Why this run happens; recorded in each database's migration log."),
        "acknowledge_drift": optional_text("Accept applied files whose content changed, for this reason."),
        "window": Param("next", type="string", pattern=WINDOW_PATTERN,
                        description="Production only. next: each service waits for its maintenance window "
                                    f"({windows}); an ISO 8601 start time (outside a window: needs force_reason); "
                                    "or now (needs force_reason)."),
        "force_reason": optional_text("Why this change cannot wait for the maintenance window (required in "
                                      "production with window=now or a time outside the window)."),
    }

    with DAG(
        dag_id=dag_id,
        description="Apply or revert the schema migrations of one OmniSphere service or all of them",
        doc_md=DOC_MD,
        schedule=None,
        catchup=False,
        max_active_runs=1,
        render_template_as_native_obj=True,
        tags=["omnisphere", "migrations"],
        default_args={"environment": ENVIRONMENT_TEMPLATE, "owner": "platform", "retries": 2, "retry_delay": timedelta(seconds=30),
                      "execution_timeout": timedelta(hours=3)},
        params=dag_params,
    ) as dag:

        def waves_for(params: dict[str, Any]) -> list[list[str]]:
            chosen = names if params["service"] == "all" else [params["service"]]
            waves: list[list[str]] = [[] for _ in range(wave_count)]
            if params.get("action", "migrate") != "migrate":
                return waves  # baseline and adopt run in record_baseline; every wave is skipped
            for name in chosen:
                level = levels[name] if params["direction"] == "up" else wave_count - 1 - levels[name]
                waves[level].append(name)
            return waves

        @task(retries=0)
        def check_params(params: dict[str, Any] | None = None, **context: Any) -> None:
            """Refuse unknown conf keys, contradictory params, a change production forbids now, and a service another
            run holds, before any database is changed; log the plan of waves."""
            assert params is not None
            log = context["task"].log  # the task's own logger: its lines land in the task log
            problem = unknown_conf_problem(context["dag_run"].conf, dag_params)
            if problem:
                raise AirflowFailException(problem)
            if not params["dry_run"] and not plain_text(params.get("reason")):
                raise AirflowFailException(
                    "param 'reason' is required when dry_run is false: say why the schema changes (it is recorded)")
            if params["service"] == "all" and params.get("target_version") is not None:
                raise AirflowFailException(
                    "param 'target_version' needs a single service: versions are numbered per service")
            problem = action_problem(params)
            if problem:
                raise AirflowFailException(problem)
            if params["action"] != "migrate":
                service = catalog.get(params["service"], params["environment"])
                if not params["dry_run"]:
                    hold_service(cast("Context", context), service, f"{params['action']} of {service.name}", log)
                log.info("%s: %s%s; no wave runs.", service.name, params["action"],
                         " as a dry run" if params["dry_run"] else "")
                return
            chosen = [catalog.get(n, params["environment"]) for wave in waves_for(params) for n in wave]
            environment = catalog.environment(params["environment"])
            if not params["dry_run"] and environment.production:
                # Refused now rather than when a window opens: a wrong window param, or no place for the backups.
                check_backup_bucket(chosen, environment)
                now = datetime.now(timezone.utc)
                for service in chosen:
                    decision = production_window(service, params["window"], params.get("force_reason") or "", now,
                                                 context["dag_run"].run_after)
                    log.info("%s: changes from %s, %s; backed up just before", service.name,
                             decision["window_start"],
                             f"in its window until {decision['window_end']}" if decision.get("window_end") else
                             "outside its window (force_reason given)")
                if params["window"] == "next":
                    log.info("window=next: each wave waits for the next window of each of its services when it "
                             "starts; with service=all the run can take days.")
            if not params["dry_run"]:  # every service first: refused before the first wave changes anything
                for service in chosen:
                    hold_service(cast("Context", context), service,
                                 f"schema migrations of {service.name} {params['direction']}", log)
            for number, members in enumerate(waves_for(params), start=1):
                if members:
                    log.info("wave %d: %s (%s)", number, ", ".join(members), params["direction"])

        @task(retries=0, multiple_outputs=False)
        def record_baseline(params: dict[str, Any] | None = None, **context: Any) -> dict[str, Any]:
            """baseline / adopt: record the versions the database already has as applied, without running them."""
            assert params is not None
            if params["action"] == "migrate":
                raise AirflowSkipException("action=migrate: nothing to record")
            log = context["task"].log
            service = catalog.get(params["service"], params["environment"])
            engine = schema_engine(service, catalog, run_label(dag_id, context["run_id"]), log)
            reason = plain_text(params.get("reason"))
            try:
                if params["action"] == "baseline":
                    result = engine.baseline(params["target_version"], reason, dry_run=params["dry_run"])
                else:
                    result = engine.adopt(reason, table=GOLANG_MIGRATE_TABLE, dry_run=params["dry_run"])
            except InvalidMigrationInput as exc:
                raise AirflowFailException(f"Refused, nothing changed: {exc}") from None
            log.info("%s", result.summary())
            return {"service": service.name, "action": params["action"], "baseline": result.version,
                    "recorded": result.recorded, "dry_run": result.dry_run}

        checked: Any = check_params()
        checked >> record_baseline()
        previous: Any = checked
        for index in range(wave_count):

            @task(task_id=f"services_of_wave_{index + 1}", retries=0, trigger_rule=TriggerRule.NONE_FAILED)
            def services_of_wave(wave: int = index, params: dict[str, Any] | None = None) -> list[str]:
                """Return the services that migrate in this wave (none: the wave is skipped)."""
                assert params is not None
                return waves_for(params)[wave]

            members = services_of_wave()
            migrate = StandaloneApplyMigrationsOperator.partial(
                task_id=f"migrate_wave_{index + 1}",
                pool=MIGRATIONS_POOL,
                direction="{{ params.direction }}",
                # revert_all: the engine's "nothing applied", below every version (0 included).
                target_version=f"{{{{ {NOTHING_APPLIED} if params.revert_all else params.target_version }}}}",
                dry_run="{{ params.dry_run }}",
                reason="{{ params.reason }}",
                acknowledge_drift="{{ params.acknowledge_drift }}",
                # Each service waits for its own window in its own task (see the module's docstring).
                **GUARD_TEMPLATES,
                # A wave with nobody in it is skipped; the next wave still runs unless something failed.
                trigger_rule=TriggerRule.NONE_FAILED,
            ).expand(service=members)
            previous >> members
            previous = migrate
    return dag
