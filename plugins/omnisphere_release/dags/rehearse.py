"""The factory of ``rehearse_<service>``: the release's database work, rehearsed on a copy of an environment.

```
restore_copy > apply_migrations > apply_data_migrations > integrity_check > drop_copy (always) > rehearsal_report (always)
```
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param, TriggerRule

from omnisphere_release.catalog import Catalog, Service
from omnisphere_release.dags.release import DATA_MIGRATION_TIMEOUT, DATABASE_STAGE_TIMEOUT, environment_param
from omnisphere_release.operators.common import ENVIRONMENT_TEMPLATE
from omnisphere_release.operators.rehearse import (
    APPLY_DATA_MIGRATIONS,
    APPLY_MIGRATIONS,
    CHECK_COPY,
    DROP_COPY,
    REHEARSAL_REPORT,
    RESTORE_COPY,
    ApplyDataMigrationsToCopyOperator,
    ApplyMigrationsToCopyOperator,
    CheckCopyOperator,
    DropCopyOperator,
    RehearsalReportOperator,
    RestoreCopyOperator,
)
from omnisphere_release.rehearsal import REHEARSAL_CONN_ID


def build_rehearse_dag(service: Service, catalog: Catalog) -> DAG:
    name = service.name
    # A rehearsal copies production unless told otherwise: that is the database whose size and locks matter.
    production = next((e.name for e in catalog.environments if e.production), catalog.default_environment)
    environment = environment_param(catalog)
    environment.value = production
    with DAG(
        dag_id=f"rehearse_{name}",
        description=f"Rehearse {name}'s migrations and data migrations on a copy of production, measured",
        doc_md=f"""
### rehearse_{name}

Restores the newest verified backup of **{name}** (or `backup_uri`, or a fresh `pg_dump`, which only reads) into a
scratch database on the `{REHEARSAL_CONN_ID}` server, applies the pending migrations and data migrations there as a
release would, runs the integrity checks, measures each step and the heaviest table locks it took, then drops the
copy. The report is kept as evidence (Variable `{catalog.evidence_bucket_variable}`); the release's preflight uses its
measured duration to check that a window has room. The environment itself is never written to.
""",
        schedule=None,
        catchup=False,
        max_active_runs=1,
        render_template_as_native_obj=False,
        tags=["omnisphere", "rehearsal", name],
        params={
            "environment": environment,
            "backup_uri": Param(None, type=["null", "string"], pattern=r"^s3://[^/]+/.+$", title="Backup",
                                description="The backup to restore (default: the environment's newest verified "
                                            "backup of the service, or a fresh dump when there is none)."),
            "target_version": Param(None, type=["null", "integer"], minimum=0, title="Target schema version",
                                    description="Apply migrations up to this version (default: all pending)."),
        },
        default_args={"environment": ENVIRONMENT_TEMPLATE, "owner": service.team or "platform", "retries": 1,
                      "retry_delay": timedelta(seconds=20), "execution_timeout": DATABASE_STAGE_TIMEOUT},
    ) as dag:
        # A retry starts its stage again on the same copy: restore_copy recreates it, the engines go on from where
        # the copy's history says they stopped.
        restore = RestoreCopyOperator(task_id=RESTORE_COPY, service=name, backup_uri="{{ params.backup_uri }}")
        migrate = ApplyMigrationsToCopyOperator(task_id=APPLY_MIGRATIONS, service=name,
                                                target_version="{{ params.target_version }}")
        data = ApplyDataMigrationsToCopyOperator(task_id=APPLY_DATA_MIGRATIONS, service=name,
                                                 execution_timeout=DATA_MIGRATION_TIMEOUT)
        check = CheckCopyOperator(task_id=CHECK_COPY, service=name)
        drop = DropCopyOperator(task_id=DROP_COPY, service=name, trigger_rule=TriggerRule.ALL_DONE, retries=2,
                                retry_delay=timedelta(seconds=10))
        report = RehearsalReportOperator(task_id=REHEARSAL_REPORT, service=name, trigger_rule=TriggerRule.ALL_DONE,
                                         retries=0)
        restore >> migrate >> data >> check >> drop >> report
    return dag
