"""Run a DAG of the project with ``dag.test()`` and read back the states of the run and of each task."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack.dag_test import dag_processor

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunOutcome:
    dag_id: str
    run_id: str
    state: str
    tasks: dict[str, str]  # "task_id" or "task_id[map_index]" -> state
    outputs: dict[str, Any] = field(default_factory=dict)

    def task(self, task_id: str) -> str | None:
        return self.tasks.get(task_id)


def get_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags[dag_id]


def xcom_values(dag_id: str, run_id: str) -> dict[str, Any]:
    """Return the return value of every task of a run, by task id."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id, key="return_value")).all()
        return {row.task_id: XComModel.deserialize_value(row) for row in rows if row.map_index < 0}


def run_dag(dag_id: str, conf: dict) -> RunOutcome:
    """Run the DAG to the end, its DAG callbacks as the DAG processor runs them; ``dag.test()`` does not raise when a
    task fails, so return every state."""
    dag = get_dag(dag_id)
    with dag_processor(dag):
        run = dag.test(run_conf=conf)
    tasks = {}
    for ti in run.get_task_instances():
        key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        tasks[key] = str(ti.state.value if hasattr(ti.state, "value") else ti.state)
    state = run.state.value if hasattr(run.state, "value") else str(run.state)
    return RunOutcome(dag_id=dag_id, run_id=run.run_id, state=state, tasks=tasks,
                      outputs=xcom_values(dag_id, run.run_id))


def push_image(service: str, tag: str) -> str:
    """Push ``omnisphere/<service>:<tag>`` into the devstack's registry, as CI does before it triggers a release
    (preflight refuses a tag that was never pushed); return its digest."""
    import boto3

    from devstack.aws import push_image as push

    return push(boto3.client("ecr", endpoint_url=os.environ["AWS_ENDPOINT_URL"]), service, tag)


def catalog_copy(folder: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """Write a copy of include/services.yaml into ``folder`` and return its path: short smoke and no-data deadlines,
    and production without approve_release (the four-eyes gate has tests of its own; these tests run without a
    second person), changed further by ``edit``."""
    import yaml

    catalog = yaml.safe_load((REPO / "include" / "services.yaml").read_text())
    for service in catalog["services"]:
        service["smoke_deadline_seconds"] = 4
        service["monitoring"]["missing_data_minutes"] = 1
    for environment in (catalog.get("environments") or {}).values():
        environment["approval"] = False
    if edit:
        edit(catalog)
    path = folder / "services.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


def auth_service_at_version_3(tmp_path: Path, monkeypatch: Any) -> Any:
    """Use the test catalog (:func:`catalog_copy`), put auth-service's schema at version 3 (one migration pending),
    and return omni-migrate's ``main`` for the test's own changes."""
    from omnisphere_release.migrations.__main__ import main as migrate

    monkeypatch.setenv("OMNISPHERE_CATALOG", str(catalog_copy(tmp_path)))
    assert migrate(["auth-service", "down", "--to", "0", "--reason", "test reset"]) == 0
    assert migrate(["auth-service", "up", "--to", "3", "--reason", "test reset"]) == 0
    return migrate
