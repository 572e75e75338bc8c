"""The factory of ``data_migrations``: run, pause, resume or revert one data migration of one service."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param

from omnisphere_release.catalog import Catalog
from omnisphere_release.datamigrate import discover_specs
from omnisphere_release.operators.datamigrate import PostgresDataMigrateOperator

DOC_MD = """
### data_migrations

Runs one batched, resumable data migration (`include/sql/<service>/data/<name>.yaml`): keyset batches of one
transaction each, with a checkpoint row in the service database, so a failed or paused run resumes exactly where it
stopped. The task log shows progress every few seconds (rows done / estimated total, rate, ETA) and the verification
at the end. `action`: `run` (also resumes), `pause` (the running migration stops after its current batch),
`revert` (only for reversible specs).
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
        default_args={"owner": "platform", "retries": 3, "retry_delay": timedelta(seconds=30),
                      "execution_timeout": timedelta(hours=12)},
        params={
            "migration": Param(choices[0] if choices else "", type="string", enum=choices or [""],
                               description="<service>/<name> of the data migration"),
            "action": Param("run", type="string", enum=["run", "pause", "revert"]),
        },
    ) as dag:
        PostgresDataMigrateOperator(
            task_id="data_migrate",
            service="{{ params.migration.split('/')[0] }}",
            migration="{{ params.migration.split('/')[1] }}",
            action="{{ params.action }}",
        )
    return dag
