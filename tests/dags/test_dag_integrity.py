"""The DAG folder parses cleanly, every DAG is documented and retried, and parsing never reaches a system."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"


def parse_dags():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture()
def unreachable_systems(monkeypatch):
    """Point every connection at a closed port and make any socket connection fail loudly."""
    from omnisphere_release.catalog import load_catalog

    for service in load_catalog().services:
        monkeypatch.setenv(f"AIRFLOW_CONN_{service.postgres_conn_id.upper()}", "postgres://u:p@127.0.0.1:9/db")
        monkeypatch.setenv(f"AIRFLOW_CONN_{service.http_conn_id.upper()}", "http://127.0.0.1:9")
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", '{"conn_type": "aws", "extra": {"endpoint_url": "http://127.0.0.1:9"}}')
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError(f"parse-time network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_dag_folder_parses_without_touching_a_database_or_aws(unreachable_systems):
    bag = parse_dags()
    assert bag.import_errors == {}
    assert unreachable_systems == []
    assert "schema_migrations" in bag.dags


def test_every_dag_has_owner_tags_doc_and_retries():
    bag = parse_dags()
    assert bag.dags
    for dag_id, dag in bag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 100, f"{dag_id} has no doc_md"
        assert dag.catchup is False
        for task in dag.tasks:
            assert task.owner and task.owner != "airflow", f"{dag_id}.{task.task_id} has no owner"
        assert dag.default_args.get("retries", 0) >= 1, f"{dag_id} has no retries in default_args"


def test_schema_migrations_params_offer_the_catalog_services():
    dag = parse_dags().dags["schema_migrations"]
    assert dag.params["dry_run"] is True
    service_param = dag.params.get_param("service")
    assert service_param.schema["enum"] == ["all", "auth-service", "billing-service", "notification-service"]
    assert [t.task_id for t in dag.tasks if t.task_id.startswith("migrate_wave_")] == [
        "migrate_wave_1", "migrate_wave_2", "migrate_wave_3"]


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda d: d["services"][0]["ecs"].update(clustr="x"), "services[0] (auth-service).ecs.clustr: unknown key"),
    (lambda d: d["services"][1].update(name="auth-service"), "services[1].name: duplicate service name 'auth-service'"),
])
def test_broken_catalog_is_one_import_error_naming_file_and_field(tmp_path, monkeypatch, mutate, expected):
    data = yaml.safe_load((REPO / "include" / "services.yaml").read_text())
    mutate(data)
    broken = tmp_path / "services.yaml"
    broken.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("OMNISPHERE_CATALOG", str(broken))
    bag = parse_dags()
    assert len(bag.import_errors) == 1
    message = next(iter(bag.import_errors.values()))
    assert str(broken) in message
    assert expected in message
    assert bag.dags == {}
