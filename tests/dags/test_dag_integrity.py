"""The DAG folder parses cleanly, every DAG is documented, every task's retries, trigger rule and timeout are the ones
its stage needs, and parsing never reaches a system."""

from __future__ import annotations

import functools
import re
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
SERVICES = ("auth-service", "billing-service", "notification-service")
DAG_IDS = ("schema_migrations", "data_migrations", "release_all", "queue_release",
           *(f"release_{s}" for s in SERVICES), *(f"rollback_{s}" for s in SERVICES),
           *(f"rehearse_{s}" for s in SERVICES))


def parse_dags():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@functools.cache
def parsed_dag(dag_id: str):
    return parse_dags().dags[dag_id]


# What each task must be, by the DAG id's family and a pattern of task ids: (retries, trigger rule). A retry must be
# harmless where it is allowed, and absent where failing again would hide a deterministic failure (a lint finding,
# an integrity violation, a failed smoke test) or double a side effect.
TASK_POLICY = {
    "release_": [
        ("wait_for_window", 0, "all_success"),
        ("preflight", 1, "all_success"),
        ("approve_release", 0, "all_success"),  # an answer is a person's: a retry would ask again
        ("backup", 1, "all_success"),  # the key derives from the run: a retry overwrites its own dump
        ("schema_up", 0, "all_success"),  # the engine retries lock timeouts itself; a failed file is not transient
        ("data_migrate", 3, "all_success"),  # resumes from its checkpoint
        ("integrity_check", 0, "all_success"),
        ("ecs_deploy", 1, "all_success"),  # a retry reattaches to the deployment its run started
        ("smoke_test", 0, "all_success"),
        ("regression_test", 1, "all_success"),  # a retry reattaches to its suite; a failed suite is not retried
        ("monitoring_gate", 0, "all_success"),
        ("finalize", 1, "all_success"),
        ("rollback_ecs", 1, "one_failed"),
        ("rollback_schema", 1, "all_success"),
        ("restore_backup", 1, "all_done"),
        ("verify_rollback", 1, "all_done"),
        ("release_failed", 0, "all_done"),
        ("report", 1, "all_done"),
    ],
    "rollback_": [("plan", 0, "all_success"), ("rollback_(ecs|schema|restore)", 1, "none_failed")],
    # Every stage acts on the scratch copy only, so it may run again; the report fails the run, which is final.
    "rehearse_": [("restore_copy|apply_migrations|apply_data_migrations|integrity_check", 1, "all_success"),
                  ("drop_copy", 2, "all_done"), ("rehearsal_report", 0, "all_done")],
    "schema_migrations": [("check_params", 0, "all_success"), ("services_of_wave_\\d+", 0, "none_failed"),
                          ("migrate_wave_\\d+", 2, "none_failed"),
                          ("record_baseline", 0, "all_success")],  # a refused baseline will not heal
    "data_migrations": [("data_migrate", 3, "all_success")],
    "release_all": [("check_manifest", 0, "all_success"),
                    # the slot gate reschedules itself; a failed dependency makes it upstream_failed, never retried
                    ("start_.+", 0, "none_failed_min_one_success"),
                    ("release_.+", 0, "all_success"), ("summary", 0, "all_done")],
    "queue_release": [("queue", 1, "all_success")],
}
# Tasks that may run without an execution_timeout, and why.
UNBOUNDED = {"wait_for_window": "waits, deferred and holding no worker slot, for a window that may be days away"}
# Tasks that may wait longer than a day, and why.
LONG_WAITS = {("release_all", "release_.+"): "a release started by hand waits for its service's own weekly window"}


def policy_for(dag_id: str, task_id: str) -> tuple[int, str]:
    family = dag_id if dag_id in TASK_POLICY else next(f for f in ("release_", "rollback_", "rehearse_")
                                                       if dag_id.startswith(f))
    for pattern, retries, trigger_rule in TASK_POLICY[family]:
        if re.fullmatch(pattern, task_id):
            return retries, trigger_rule
    raise AssertionError(f"{dag_id}.{task_id} has no policy in TASK_POLICY: say what its retries and trigger rule "
                         f"must be")


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_every_task_has_the_retries_trigger_rule_and_timeout_its_stage_needs(dag_id):
    dag = parsed_dag(dag_id)
    assert dag.tasks, dag_id
    for task in dag.tasks:
        where = f"{dag_id}.{task.task_id}"
        retries, trigger_rule = policy_for(dag_id, task.task_id)
        assert task.retries == retries, f"{where}: retries {task.retries}, expected {retries}"
        assert getattr(task.trigger_rule, "value", task.trigger_rule) == trigger_rule, \
            f"{where}: trigger rule {task.trigger_rule}, expected {trigger_rule}"
        if task.task_id in UNBOUNDED:
            assert task.execution_timeout is None, f"{where}: {UNBOUNDED[task.task_id]}"
        else:
            assert task.execution_timeout is not None, f"{where} has no execution_timeout: a hung task would hold " \
                                                       f"the service's one release slot for ever"
            long_wait = any(dag_id == d and re.fullmatch(p, task.task_id) for d, p in LONG_WAITS)
            limit = timedelta(days=8) if long_wait else timedelta(hours=25)
            assert timedelta(minutes=1) <= task.execution_timeout <= limit, where


def test_every_dag_of_the_catalog_is_checked():
    assert sorted(parse_dags().dags) == sorted(DAG_IDS)


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
