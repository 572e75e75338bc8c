"""The README's table leads from every task id of the release and rollback DAGs to the class and module that run it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.dags.test_dag_integrity import parsed_dag

REPO = Path(__file__).resolve().parents[2]


def table_rows(dag_id: str) -> list[str]:
    """Return the table's rows of ``dag_id`` (a row with an empty first cell belongs to the DAG above it)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### From a task id to its code"):]
    rows, current = [], None
    for line in section.splitlines():
        if not (line.startswith("| ") and "`" in line):
            continue
        first = line.split("|")[1].strip().replace("&lt;service&gt;", "")
        current = first or current
        if current and (dag_id == current or (current.endswith("_") and dag_id.startswith(current))):
            rows.append(line)
    return rows


def named_per_service(task_id: str, row: str) -> bool:
    """Tell whether a row names ``task_id`` as one of a task per service, e.g. `start_<service>`."""
    return any(task_id.startswith(prefix) for prefix in re.findall(r"`([a-z_]+_)<service>`", row))


@pytest.mark.parametrize("dag_id", ["release_billing-service", "rollback_auth-service", "release_all", "queue_release",
                                    "data_migrations"])
def test_every_task_id_is_in_the_table_with_its_operator_and_module(dag_id):
    rows = table_rows(dag_id)
    assert rows, f"{dag_id} has no rows in the README's task table"
    for task in parsed_dag(dag_id).tasks:
        if type(task).__module__.startswith("airflow."):
            continue  # Airflow's own operators (short-circuit, TriggerDagRun): the row names the DAG factory
        name = task.task_id
        row = next((r for r in rows if re.search(rf"`{re.escape(name)}`", r) or named_per_service(name, r)), None)
        assert row, f"{dag_id}.{name} is not in the README's task table"
        assert type(task).__name__ in row, f"{name}: its operator {type(task).__name__} is not named in its row"
        module = type(task).__module__.removeprefix("omnisphere_release.").replace(".", "/") + ".py"
        assert module in row, f"{name}: its module {module} is not named in its row"
        assert (REPO / "plugins" / "omnisphere_release" / module).is_file()
