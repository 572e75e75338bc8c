"""Airflow operators, one module per stage: thin wrappers that drive the engines and hooks."""
