"""Every OmniSphere Airflow DAG, built from the service catalog (include/services.yaml).

One file on purpose: a broken catalog then shows up as one import error naming the catalog file and the field,
instead of one per DAG. Parsing reads local files only: no database, no AWS. A task's process builds only its own DAG
(Airflow's parsing context names it), so that starting a task does not grow with the catalog.
"""

from airflow.sdk import get_parsing_context

from omnisphere_release.catalog import load_catalog
from omnisphere_release.dags import build_dags

omnisphere_dags = build_dags(load_catalog(), only=get_parsing_context().dag_id)
