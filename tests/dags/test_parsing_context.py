"""A task's process builds only its own DAG: Airflow names it in the parsing context, and the DAG built alone is the
same DAG as the one the DAG processor builds among all the others."""

from __future__ import annotations

import pytest

from tests.dags.test_dag_integrity import DAG_IDS, parse_dags

PARSING_CONTEXT_DAG_ID = "_AIRFLOW_PARSING_CONTEXT_DAG_ID"  # what Airflow's task runner sets (sdk context)


@pytest.mark.parametrize("dag_id", ["release_billing-service", "rollback_auth-service", "release_all"])
def test_a_task_process_builds_only_its_own_dag_and_the_same_one(monkeypatch, dag_id):
    everything = parse_dags().dags[dag_id]
    monkeypatch.setenv(PARSING_CONTEXT_DAG_ID, dag_id)
    bag = parse_dags()
    assert not bag.import_errors
    assert sorted(bag.dags) == [dag_id]
    alone = bag.dags[dag_id]
    assert sorted(alone.task_dict) == sorted(everything.task_dict)
    assert {t: sorted(alone.task_dict[t].upstream_task_ids) for t in alone.task_dict} == \
        {t: sorted(everything.task_dict[t].upstream_task_ids) for t in everything.task_dict}
    assert alone.params.dump() == everything.params.dump()


def test_an_unknown_dag_id_in_the_parsing_context_builds_every_dag(monkeypatch):
    monkeypatch.setenv(PARSING_CONTEXT_DAG_ID, "release_retired-service")
    assert set(DAG_IDS) <= set(parse_dags().dags)
