"""The factory of ``release_all``: release a manifest (service -> image tag) in waves that follow depends_on.

Each service is released by its own ``release_<service>`` run (its own backup, rollback and report), triggered and
waited for without holding a worker slot. A service starts once every service it depends on was released and fewer
than ``max_parallel`` releases of the run are under way (its ``start_<service>`` gate waits, rescheduled, for a slot).
A failed release stops the services that depend on it and every service not yet started; releases already under way
finish normally. The summary says of each service whether it was released, failed, rolled back or not attempted, and
why, with a link to its release run.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param, TriggerRule

from omnisphere_release.catalog import Catalog
from omnisphere_release.dags.release import environment_param
from omnisphere_release.operators.release_all import (
    CHECK_MANIFEST,
    ReleaseAllSummaryOperator,
    ReleaseManifestCheckOperator,
    ReleaseTrainSlotOperator,
    max_parallel_bounds,
)
from omnisphere_release.params import optional_text
from omnisphere_release.release_train import RELEASE_PREFIX, START_PREFIX
from omnisphere_release.timetables import MaintenanceWindowTimetable


def build_release_all_dag(catalog: Catalog, dag_id: str = "release_all") -> DAG:
    services = catalog.release_order()
    w = catalog.release_all_window
    schedule = MaintenanceWindowTimetable(w.cron, w.duration_minutes, w.timezone) if w else None
    lowest, highest = max_parallel_bounds()
    waves = "; ".join(f"{s.name} after {', '.join(s.depends_on)}" for s in services if s.depends_on)
    with DAG(
        dag_id=dag_id,
        description="Release several services in waves that follow depends_on, at most max_parallel at once",
        doc_md=__doc__ + f"\n\nDependencies: {waves or 'none'}. At most {catalog.release_train.max_parallel} at once "
                         f"unless the run says otherwise.",
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
            "environment": environment_param(catalog),
            "force_reason": optional_text("Release every service now, outside its window, for this reason (a "
                                          "hand-triggered run otherwise releases each in its own window).",
                                          title="Force reason"),
            "evidence_override": optional_text("Release images without the promotion evidence the environment "
                                               "requires, for this reason (on record in every release; an approver "
                                               "must accept each where the environment requires one).",
                                               title="Evidence override"),
            "max_parallel": Param(catalog.release_train.max_parallel, type="integer", minimum=lowest, maximum=highest,
                                  title="Max parallel",
                                  description=f"How many services release at once ({lowest} to {highest}; the "
                                              f"catalog's release_train.max_parallel by default). A service still "
                                              f"waits for every service it depends on."),
        },
    ) as dag:
        check = ReleaseManifestCheckOperator(task_id=CHECK_MANIFEST, retries=0)
        checked = f"ti.xcom_pull(task_ids='{CHECK_MANIFEST}')"
        releases: dict[str, TriggerDagRunOperator] = {}
        for service in services:  # dependencies first, so that their release tasks exist
            name = service.name
            # Runs once check_manifest passed and every dependency was released or is not in the manifest; a failed
            # dependency makes it (and so the release) upstream_failed: "depends on X which failed".
            start = ReleaseTrainSlotOperator(task_id=f"{START_PREFIX}{name}", service=name, retries=0,
                                             trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
            release = TriggerDagRunOperator(
                task_id=f"{RELEASE_PREFIX}{name}",
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
            check >> start >> release
            for dependency in service.depends_on:
                releases[dependency] >> start
            releases[name] = release

        list(releases.values()) >> ReleaseAllSummaryOperator(task_id="summary", trigger_rule=TriggerRule.ALL_DONE,
                                                             retries=0)
    return dag
