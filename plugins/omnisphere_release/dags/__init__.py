"""The DAG factories: one module per DAG (or family of DAGs), wiring only; the stages live in operators/, the rules in
checks.py. dags/omnisphere_dags.py calls them with the catalog."""
