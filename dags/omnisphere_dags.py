"""Every OmniSphere Airflow DAG, built from the service catalog (include/services.yaml).

One file on purpose: a broken catalog then shows up as one import error naming the catalog file and the field,
instead of one per DAG. Parsing reads local files only: no database, no AWS.
"""

from omnisphere_release.catalog import load_catalog
from omnisphere_release.dags.data_migrations import build_data_migrations_dag
from omnisphere_release.dags.queue_release import build_queue_release_dag
from omnisphere_release.dags.release import build_release_dags
from omnisphere_release.dags.release_all import build_release_all_dag
from omnisphere_release.dags.rollback import build_rollback_dags
from omnisphere_release.dags.schema_migrations import build_schema_migrations_dag

catalog = load_catalog()

schema_migrations = build_schema_migrations_dag(catalog)
release_dags = build_release_dags(catalog)
rollback_dags = build_rollback_dags(catalog)
release_all = build_release_all_dag(catalog)
data_migrations = build_data_migrations_dag(catalog)
queue_release = build_queue_release_dag(catalog)
