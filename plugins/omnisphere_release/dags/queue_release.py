"""The factory of ``queue_release``: queue a manifest for a release_all window (the next one, or a given start)."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param

from omnisphere_release.catalog import Catalog
from omnisphere_release.checks import window_schedule
from omnisphere_release.dags.release import environment_param
from omnisphere_release.operators.release_all import QueueReleaseOperator
from omnisphere_release.params import optional_text


def build_queue_release_dag(catalog: Catalog) -> DAG | None:
    """Return ``queue_release``, or None when the catalog sets no release_all window."""
    if catalog.release_all_window is None:
        return None
    schedule = window_schedule(catalog.release_all_window)
    with DAG(
        dag_id="queue_release",
        description=f"Queue a manifest for release_all in a maintenance window ({schedule.summary()})",
        doc_md=f"""
### queue_release

Queues a manifest (`{{"service": "image tag"}}`) for a **release_all** window ({schedule.summary()}): `next`, or the
ISO 8601 start of a later window. At that window, release_all releases it in depends_on order; a window with nothing
queued releases nothing. Queuing again for the same window replaces the earlier manifest. In an environment with
`promote_from` (production), every image must have its evidence there (a successful release of the same digest and
checksums): checked when queued, and again when the window opens.
""",
        schedule=None,
        catchup=False,
        tags=["omnisphere", "release"],
        # Queuing again replaces: safe to retry.
        default_args={"owner": "platform", "retries": 1, "execution_timeout": timedelta(minutes=10)},
        params={
            "manifest": Param({}, type="object", description='Service -> image tag, e.g. {"auth-service": "1.4.0"}.'),
            "window": Param("next", type="string", description="next, or the ISO 8601 start of a window."),
            "reason": optional_text("Why; kept with the queued manifest and passed to every release."),
            "environment": environment_param(catalog),
        },
    ) as dag:
        QueueReleaseOperator(task_id="queue")
    return dag
