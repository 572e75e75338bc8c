"""OmniSphere release orchestrator: the catalog, the engines, and the Airflow hooks, operators and DAG factories."""
