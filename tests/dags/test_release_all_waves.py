"""release_all's shape follows the catalog's depends_on: each service's start gate waits for its check and for the
releases it depends on, and a failed dependency stops it (upstream_failed), transitively. Built from a diamond
catalog: billing and search need auth, notification needs billing and search."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from omnisphere_release.catalog import parse_catalog
from omnisphere_release.dags.release_all import build_release_all_dag

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def diamond(tmp_path):
    raw = yaml.safe_load((REPO / "include" / "services.yaml").read_text())
    by_name = {s["name"]: s for s in raw["services"]}
    search = copy.deepcopy(by_name["billing-service"])
    search["name"] = "search-service"
    by_name["billing-service"]["depends_on"] = ["auth-service"]
    search["depends_on"] = ["auth-service"]
    by_name["notification-service"]["depends_on"] = ["billing-service", "search-service"]
    raw["services"].append(search)
    raw["release_train"] = {"max_parallel": 3}
    for name in by_name.keys() | {"search-service"}:
        (tmp_path / "sql" / name / "migrations").mkdir(parents=True)
    return parse_catalog(yaml.safe_dump(raw), tmp_path / "services.yaml", tmp_path / "sql")


def upstream(dag, task_id: str) -> set[str]:
    return set(dag.get_task(task_id).upstream_task_ids)


def test_each_start_gate_waits_for_the_check_and_for_what_its_service_depends_on(diamond):
    dag = build_release_all_dag(diamond)
    assert upstream(dag, "start_auth-service") == {"check_manifest"}
    assert upstream(dag, "start_billing-service") == {"check_manifest", "release_auth-service"}
    assert upstream(dag, "start_search-service") == {"check_manifest", "release_auth-service"}
    assert upstream(dag, "start_notification-service") == {"check_manifest", "release_billing-service",
                                                           "release_search-service"}
    for name in diamond.names:
        assert upstream(dag, f"release_{name}") == {f"start_{name}"}
        gate = dag.get_task(f"start_{name}")
        # A dependency left out of the manifest (skipped) lets it run; a failed one makes it upstream_failed.
        assert gate.trigger_rule == "none_failed_min_one_success"
        # One decision on a worker; waiting for a slot is deferred (tests/unit/test_release_train_trigger.py).
        assert gate.execution_timeout.total_seconds() <= 300
        assert gate.poll_seconds > 0
        assert dag.get_task(f"release_{name}").trigger_rule == "all_success"
    assert upstream(dag, "summary") == {f"release_{name}" for name in diamond.names}


def test_max_parallel_defaults_to_the_catalogs_and_is_bounded_like_it(diamond):
    param = build_release_all_dag(diamond).params.get_param("max_parallel")
    assert param.value == 3
    assert (param.schema["minimum"], param.schema["maximum"]) == (1, 50)
