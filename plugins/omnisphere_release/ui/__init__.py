"""The Releases page of the Airflow UI: a calendar of maintenance windows and what will run in them, and each service's
release history. The engines (calendar, history) know nothing of Airflow; metadata.py reads Airflow's metadata
(read only) and app.py is the FastAPI app the plugin mounts at ``/omnisphere``."""
