"""The DAG factories: one module per DAG (or family of DAGs), wiring only; the stages live in operators/, the rules in
checks.py. dags/omnisphere_dags.py calls :func:`build_dags` with the catalog."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from airflow.sdk import DAG

from omnisphere_release.catalog import Catalog


def build_dags(catalog: Catalog, only: str | None = None) -> list[DAG]:
    """Build every DAG of the catalog, or only the one whose id is ``only`` when it is one of them.

    A task's process parses the DAG file to run one task of one DAG (Airflow names it in the parsing context): building
    only that DAG keeps a task's start from growing with the catalog. Under load, with 20 services and 10 releases at
    once on two cores, parsing every DAG in each task's process took longer than Airflow's 30 s parse timeout.
    """
    from omnisphere_release.dags.data_migrations import build_data_migrations_dag
    from omnisphere_release.dags.queue_release import build_queue_release_dag
    from omnisphere_release.dags.rehearse import build_rehearse_dag
    from omnisphere_release.dags.release import build_release_dag
    from omnisphere_release.dags.release_all import build_release_all_dag
    from omnisphere_release.dags.rollback import build_rollback_dag
    from omnisphere_release.dags.schema_migrations import build_schema_migrations_dag

    # queue_release exists only when the catalog has a release_all window.
    builders: dict[str, Callable[[], DAG | None]] = {
        "schema_migrations": partial(build_schema_migrations_dag, catalog),
        **{f"release_{s.name}": partial(build_release_dag, s, catalog, catalog.has_data_migrations(s.name))
           for s in catalog.services},
        **{f"rollback_{s.name}": partial(build_rollback_dag, s, catalog) for s in catalog.services},
        **{f"rehearse_{s.name}": partial(build_rehearse_dag, s, catalog) for s in catalog.services},
        "release_all": partial(build_release_all_dag, catalog),
        "data_migrations": partial(build_data_migrations_dag, catalog),
        "queue_release": partial(build_queue_release_dag, catalog),
    }
    chosen = [builders[only]] if only in builders else builders.values()
    return [dag for build in chosen if (dag := build()) is not None]
