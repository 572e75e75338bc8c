"""The factory of the ``schema_migrations`` DAG: run the migration engine for one service or all of them.

``all`` runs one mapped task per service, in waves that follow the catalog's ``depends_on`` (a service migrates
after the services it depends on; ``down`` runs the waves in reverse), and the ``omnisphere_migrations`` pool bounds how
many migrate at once. The number of waves is the depth of the dependency graph, known when the DAG is parsed.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from airflow.sdk import DAG, Context, Param, TriggerRule, task
from airflow.sdk.exceptions import AirflowFailException

from omnisphere_release.catalog import Catalog
from omnisphere_release.operators.common import hold_service
from omnisphere_release.operators.migrations import PostgresApplyMigrationsOperator
from omnisphere_release.params import optional_text

MIGRATIONS_POOL = "omnisphere_migrations"

DOC_MD = """
### schema_migrations

Applies (`up`) or reverts (`down`) the schema migrations of one OmniSphere service, or of `all` of them in
`depends_on` order (reverse order for `down`). Replaces `run-migrations.sh <service|all> <up|down>`.

* **dry_run** is on by default: the run prints the plan (files, SQL, lint findings) and changes nothing.
  Turn it off, and give a **reason**, to apply.
* **target_version**: `up` applies up to it (default: the latest); `down` reverts every version above it
  (default: the last one only; `0` reverts everything). Only with a single service.
* A file changed after it was applied is refused (drift) unless **acknowledge_drift** says why.
* Each task log says what was applied, in what time, from which version to which.
"""


def dependency_levels(catalog: Catalog) -> dict[str, int]:
    """Return each service's depth in the depends_on graph (0 for services that depend on nothing)."""
    levels: dict[str, int] = {}
    for service in catalog.release_order():
        levels[service.name] = 1 + max((levels[d] for d in service.depends_on), default=-1)
    return levels


def build_schema_migrations_dag(catalog: Catalog, dag_id: str = "schema_migrations") -> DAG:
    levels = dependency_levels(catalog)
    wave_count = max(levels.values()) + 1
    names = catalog.names

    with DAG(
        dag_id=dag_id,
        description="Apply or revert the schema migrations of one OmniSphere service or all of them",
        doc_md=DOC_MD,
        schedule=None,
        catchup=False,
        max_active_runs=1,
        render_template_as_native_obj=True,
        tags=["omnisphere", "migrations"],
        default_args={"owner": "platform", "retries": 2, "retry_delay": timedelta(seconds=30),
                      "execution_timeout": timedelta(hours=3)},
        params={
            "service": Param("all", type="string", enum=["all", *names],
                             description="The service to migrate, or all of them in dependency order."),
            "direction": Param("up", type="string", enum=["up", "down"]),
            "target_version": Param(None, type=["null", "integer"], minimum=0,
                                    description="up: apply up to this version; down: revert every version above it."),
            "dry_run": Param(True, type="boolean",
                             description="Print the plan and change nothing. Applying is a choice: turn it off."),
            "reason": optional_text("Why this run happens; recorded in each database's migration log."),
            "acknowledge_drift": optional_text("Accept applied files whose content changed, for this reason."),
        },
    ) as dag:

        def waves_for(params: dict[str, Any]) -> list[list[str]]:
            chosen = names if params["service"] == "all" else [params["service"]]
            waves: list[list[str]] = [[] for _ in range(wave_count)]
            for name in chosen:
                level = levels[name] if params["direction"] == "up" else wave_count - 1 - levels[name]
                waves[level].append(name)
            return waves

        @task(retries=0)
        def check_params(params: dict[str, Any] | None = None, **context: Any) -> None:
            """Refuse contradictory params and a service another run holds before any database is changed, and log
            the plan of waves."""
            assert params is not None
            log = context["task"].log  # the task's own logger: its lines land in the task log
            if not params["dry_run"] and not (params.get("reason") or "").strip():
                raise AirflowFailException(
                    "param 'reason' is required when dry_run is false: say why the schema changes (it is recorded)")
            if params["service"] == "all" and params.get("target_version") is not None:
                raise AirflowFailException(
                    "param 'target_version' needs a single service: versions are numbered per service")
            if not params["dry_run"]:  # every service first: refused before the first wave changes anything
                for name in (n for wave in waves_for(params) for n in wave):
                    hold_service(cast("Context", context), catalog.get(name),
                                 f"schema migrations of {name} {params['direction']}", log)
            for number, members in enumerate(waves_for(params), start=1):
                if members:
                    log.info("wave %d: %s (%s)", number, ", ".join(members), params["direction"])

        previous: Any = check_params()
        for index in range(wave_count):

            @task(task_id=f"services_of_wave_{index + 1}", retries=0, trigger_rule=TriggerRule.NONE_FAILED)
            def services_of_wave(wave: int = index, params: dict[str, Any] | None = None) -> list[str]:
                """Return the services that migrate in this wave (none: the wave is skipped)."""
                assert params is not None
                return waves_for(params)[wave]

            members = services_of_wave()
            migrate = PostgresApplyMigrationsOperator.partial(
                task_id=f"migrate_wave_{index + 1}",
                pool=MIGRATIONS_POOL,
                direction="{{ params.direction }}",
                target_version="{{ params.target_version }}",
                dry_run="{{ params.dry_run }}",
                reason="{{ params.reason }}",
                acknowledge_drift="{{ params.acknowledge_drift }}",
                # A wave with nobody in it is skipped; the next wave still runs unless something failed.
                trigger_rule=TriggerRule.NONE_FAILED,
            ).expand(service=members)
            previous >> members
            previous = migrate
    return dag
