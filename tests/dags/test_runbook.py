"""docs/runbook.md maps the release checklist to the DAGs' stages: when a stage, a DAG or a param is added or renamed,
the runbook must follow, or the person reading it at night looks for a task that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

from tests.dags.test_dag_integrity import parse_dags

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = (REPO / "docs" / "runbook.md").read_text()
MENTIONED = set(re.findall(r"`([a-z_<>-]+)`", RUNBOOK))


def test_every_stage_of_a_release_and_of_a_manual_rollback_is_in_the_runbook():
    dags = parse_dags().dags
    for dag_id in ("release_auth-service", "rollback_auth-service"):
        missing = sorted(task_id for task_id in dags[dag_id].task_ids if task_id not in MENTIONED)
        assert missing == [], f"{dag_id}: stages missing from docs/runbook.md"
    rollback_params = set(dags["rollback_auth-service"].params)
    assert sorted(rollback_params - MENTIONED) == []


def test_every_dag_the_runbook_names_exists():
    dag_ids = set(parse_dags().dags)
    named = {name.replace("<service>", "auth-service") for name in MENTIONED
             if re.fullmatch(r"(release|rollback)_<service>|schema_migrations|data_migrations|release_all|"
                             r"queue_release", name)}
    assert len(named) == 6
    assert sorted(named - dag_ids) == []
