"""The factory of ``data_migrations``: run, pause, resume or revert one data migration of one service."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param

from omnisphere_release.catalog import Catalog
from omnisphere_release.checks import WINDOW_PATTERN
from omnisphere_release.dags.release import environment_param
from omnisphere_release.datamigrate import discover_specs
from omnisphere_release.operators.common import ENVIRONMENT_TEMPLATE
from omnisphere_release.operators.standalone import (
    GUARD_TEMPLATES,
    StandaloneDataMigrateOperator,
)
from omnisphere_release.params import optional_text

DOC_MD = """
### data_migrations

Runs one batched, resumable data migration (`include/sql/<service>/data/<name>.yaml`): keyset batches of one
transaction each, with a checkpoint row in the service database, so a failed or paused run resumes exactly where it
stopped. The task log shows progress every few seconds (rows done / estimated total, rate, ETA) and the verification
at the end. `action`: `run` (also resumes), `pause` (the running migration stops after its current batch),
`revert` (only for reversible specs).

In production (param **environment**, an environment the catalog marks `production`), `run` and `revert` need a **reason**, wait for the service's maintenance
window (**window** `next`; or an ISO 8601 start; outside a window, or `now`, only with a **force_reason**), and back
the service's database up to S3 (`<service>/<run id>/data_migrations.dump`, sha256-tagged, verified) before the
first batch. A `pause` is a request to the running migration and needs none of it. A conf key the DAG does not know
is refused, with the closest known one.
"""


def build_data_migrations_dag(catalog: Catalog) -> DAG:
    choices = sorted(f"{s.name}/{spec.name}" for s in catalog.services
                     for spec in discover_specs(catalog.sql_dir / s.name / "data"))
    with DAG(
        dag_id="data_migrations",
        description="Run, pause, resume or revert a batched data migration",
        doc_md=DOC_MD,
        schedule=None,
        catchup=False,
        tags=["omnisphere", "migrations", "data"],
        # Resumable: a retry, or a run after the timeout, goes on from the checkpoint.
        default_args={"environment": ENVIRONMENT_TEMPLATE, "owner": "platform", "retries": 3, "retry_delay": timedelta(seconds=30),
                      "execution_timeout": timedelta(hours=12)},
        params={
            "environment": environment_param(catalog),
            "migration": Param(choices[0] if choices else "", type="string", enum=choices or [""],
                               description="<service>/<name> of the data migration"),
            "action": Param("run", type="string", enum=["run", "pause", "revert"]),
            "reason": optional_text("Why this data changes (required in production for run and revert); kept in "
                                    "the task log and the checkpoint."),
            "window": Param("next", type="string", pattern=WINDOW_PATTERN,
                            description="Production only. next: wait for the service's maintenance window; an ISO "
                                        "8601 start time (outside a window: needs force_reason); or now (needs "
                                        "force_reason)."),
            "force_reason": optional_text("Why this change cannot wait for the maintenance window (required in "
                                          "production with window=now or a time outside the window)."),
        },
    ) as dag:
        # The DAG's first and only task: it refuses unknown conf keys itself, then waits, backs up and migrates.
        StandaloneDataMigrateOperator(
            task_id="data_migrate",
            service="{{ params.migration.split('/')[0] }}",
            migration="{{ params.migration.split('/')[1] }}",
            action="{{ params.action }}",
            reason="{{ params.reason or '' }}",
            **GUARD_TEMPLATES,
        )
    return dag
