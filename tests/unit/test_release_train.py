"""The release train's rules: when a service of a release_all run may start, and how each service ended."""

from __future__ import annotations

import pytest

from omnisphere_release.release_train import max_parallel_problem, start_decision, train_outcomes

# A diamond: billing and search need auth; notification needs billing and search. Release order as the catalog's.
ORDER = ["auth", "billing", "search", "notification"]
DEPENDS_ON = {"auth": (), "billing": ("auth",), "search": ("auth",), "notification": ("billing", "search")}


def test_a_service_starts_while_fewer_than_max_parallel_hold_a_slot():
    running = {"start_auth": "success", "release_auth": "success", "start_billing": "success",
               "release_billing": "deferred", "start_search": "running"}
    assert start_decision("search", ORDER, running, 2).action == "go"
    decision = start_decision("search", ORDER, running, 1)
    assert decision.action == "wait"
    assert decision.why == "1 of 1 slots held (billing)"


def test_two_gates_asking_at_once_take_the_free_slots_in_release_order():
    asking = {"start_auth": "success", "release_auth": "success", "start_billing": "running",
              "start_search": "up_for_reschedule"}
    # Each gate reads the same states: only billing (first in release order) takes the one slot.
    assert start_decision("billing", ORDER, asking, 1).action == "go"
    assert start_decision("search", ORDER, asking, 1).action == "wait"
    assert "first in line: billing" in start_decision("search", ORDER, asking, 1).why
    # Once billing holds its slot, search still waits; with two slots both go.
    holding = {**asking, "start_billing": "success", "release_billing": "none"}
    assert start_decision("search", ORDER, holding, 1).action == "wait"
    assert start_decision("search", ORDER, asking, 2).action == "go"
    assert start_decision("billing", ORDER, asking, 2).action == "go"


def test_a_gate_not_yet_asking_does_not_block_one_that_is():
    # search's gate waits for its dependency (state none): billing alone asks for the slot.
    only_billing = {"start_auth": "success", "release_auth": "success", "start_billing": "running",
                    "start_search": "none"}
    assert start_decision("billing", ORDER, only_billing, 1).action == "go"


def test_after_a_failure_nothing_else_starts_and_a_service_outside_the_manifest_never_does():
    failed = {"start_auth": "success", "release_auth": "success", "start_billing": "success",
              "release_billing": "failed", "start_search": "running"}
    decision = start_decision("search", ORDER, failed, 4)
    assert (decision.action, decision.why) == ("skip", "not started after billing failed")
    assert start_decision("search", ["auth", "billing"], {}, 4).action == "skip"


def test_outcomes_say_released_rolled_back_failed_or_not_attempted_and_why():
    run = {"release_auth": "success", "release_billing": "failed", "release_search": "success",
           "release_notification": "upstream_failed"}
    outcomes = {o.service: (o.outcome, o.why) for o in train_outcomes(ORDER, DEPENDS_ON, run, {"billing": True})}
    assert outcomes == {
        "auth": ("released", "every stage passed"),
        "billing": ("rolled back", "its release failed and was rolled back"),
        "search": ("released", "every stage passed"),
        "notification": ("not attempted", "depends on billing which failed"),
    }
    # auth fails and is not rolled back: its dependents are stopped through it, transitively named.
    run = {"release_auth": "failed", "release_billing": "upstream_failed", "release_search": "upstream_failed",
           "release_notification": "upstream_failed"}
    outcomes = {o.service: (o.outcome, o.why) for o in train_outcomes(ORDER, DEPENDS_ON, run, {"auth": False})}
    assert outcomes["auth"][0] == "failed"
    assert outcomes["notification"] == ("not attempted", "depends on auth which failed")
    # An independent service that had not started when another failed.
    independent = {"auth": (), "billing": (), "search": (), "notification": ()}
    run = {"release_auth": "failed", "release_billing": "success", "release_search": "skipped"}
    outcomes = {o.service: (o.outcome, o.why) for o in train_outcomes(ORDER[:3], independent, run, {"auth": True})}
    assert outcomes["search"] == ("not attempted", "not started after auth failed")


@pytest.mark.parametrize("value", [0, 51, -1, True, "4", 2.5, None])
def test_a_max_parallel_that_is_not_a_count_is_refused_naming_the_param(value):
    problem = max_parallel_problem(value, 1, 50)
    assert problem is not None and problem.startswith("param max_parallel: ")
    assert "from 1 to 50" in problem


def test_a_max_parallel_within_bounds_is_accepted():
    assert max_parallel_problem(1, 1, 50) is None
    assert max_parallel_problem(50, 1, 50) is None
