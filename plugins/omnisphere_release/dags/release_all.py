"""The factory of ``release_all``: release a manifest (service -> image tag) in depends_on order.

Each service is released by its own ``release_<service>`` run (its own backup, rollback and report), triggered and
waited for without holding a worker slot. The first failure stops the chain: that service rolled itself back, the
services released before it stay released, the ones after it are not attempted, and the summary says which is which.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param, TriggerRule, task

from omnisphere_release.catalog import Catalog
from omnisphere_release.operators.release_all import (
    CHECK_MANIFEST,
    ReleaseAllSummaryOperator,
    ReleaseManifestCheckOperator,
)
from omnisphere_release.params import optional_text
from omnisphere_release.timetables import MaintenanceWindowTimetable


def build_release_all_dag(catalog: Catalog, dag_id: str = "release_all") -> DAG:
    order = [service.name for service in catalog.release_order()]
    w = catalog.release_all_window
    schedule = MaintenanceWindowTimetable(w.cron, w.duration_minutes, w.timezone) if w else None
    with DAG(
        dag_id=dag_id,
        description="Release several services in depends_on order, stopping at the first failure",
        doc_md=__doc__ + f"\n\nRelease order: {' -> '.join(order)}.",
        schedule=schedule,
        start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        # Templates render as text: native rendering would turn an image tag like 1.10 into the float 1.1.
        render_template_as_native_obj=False,
        tags=["omnisphere", "release"],
        default_args={"owner": "platform", "retries": 1, "retry_delay": timedelta(seconds=20),
                      "execution_timeout": timedelta(minutes=30)},
        params={
            "manifest": Param({}, type="object", description='Service -> image tag, e.g. {"auth-service": "1.4.0"}.'),
            "reason": optional_text("Why; passed to every release."),
            "staging_rehearsed": Param(False, type="boolean", description="The manifest went through staging."),
            "force_reason": optional_text("Release every service now, outside its window, for this reason (a "
                                          "hand-triggered run otherwise releases each in its own window).",
                                          title="Force reason"),
        },
    ) as dag:
        previous: Any = ReleaseManifestCheckOperator(task_id=CHECK_MANIFEST, retries=0)
        checked = f"ti.xcom_pull(task_ids='{CHECK_MANIFEST}')"
        releases = []
        for name in order:

            @task.short_circuit(task_id=f"include_{name}", ignore_downstream_trigger_rules=False,
                                trigger_rule=TriggerRule.NONE_FAILED, retries=0)
            def include(service: str = name, ti: Any = None) -> bool:
                """Release this service only if the manifest names it."""
                return service in (ti.xcom_pull(task_ids=CHECK_MANIFEST) or {}).get("manifest", {})

            gate = include()
            release = TriggerDagRunOperator(
                task_id=f"release_{name}",
                trigger_dag_id=f"release_{name}",
                trigger_run_id=f"{{{{ run_id }}}}__{name}",
                # As JSON, which the operator parses: booleans stay booleans (check_manifest builds each conf).
                # (typed dict only, but a str is documented and json.loads'ed by the operator)
                conf=f"{{{{ {checked}['release_confs']['{name}'] | tojson }}}}",  # type: ignore[arg-type]
                wait_for_completion=True,
                deferrable=True,
                poke_interval=5,
                allowed_states=["success"],
                failed_states=["failed"],
                skip_when_already_exists=True,
                retries=0,
                # Waits, deferred, for a whole release of the service (each of its stages is bounded), which may first
                # wait for the service's own weekly window when release_all was triggered by hand.
                execution_timeout=timedelta(days=8),
            )
            previous >> gate >> release
            previous = release
            releases.append(release)

        releases >> ReleaseAllSummaryOperator(task_id="summary", trigger_rule=TriggerRule.ALL_DONE, retries=0)
    return dag
