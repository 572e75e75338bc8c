"""The release train's rules: when a service of a ``release_all`` run may start, and how each service ended.

A service of the manifest starts once every service it depends on was released (the DAG's edges see to that) and
fewer than ``max_parallel`` services of the run hold a release slot. A failure stops what depends on the failed
service (the edges again: upstream_failed) and whatever has not started yet (:func:`start_decision`); releases
already running finish normally. Pure functions over task states, importable without Airflow: the gate and the
summary in operators/release_all.py only read states and call these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Task ids per service in release_all: the gate that waits for a slot, and the trigger of the service's release run.
START_PREFIX = "start_"
RELEASE_PREFIX = "release_"
# A task in one of these states is done; any other state (none, scheduled, queued, running, deferred, ...) is not.
DONE = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})
# A gate in one of these states has every dependency released and asks for a slot now.
ASKING = frozenset({"scheduled", "queued", "running", "up_for_reschedule", "up_for_retry", "deferred", "restarting"})

RELEASED, FAILED, ROLLED_BACK, NOT_ATTEMPTED = "released", "failed", "rolled back", "not attempted"


def max_parallel_problem(value: Any, minimum: int, maximum: int) -> str | None:
    """Return why ``max_parallel`` is not a usable count of parallel releases; None when it is."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        return (f"param max_parallel: {value!r} is not a whole number from {minimum} to {maximum}; give how many "
                f"services may release at once (the catalog's release_train.max_parallel is the default). Nothing "
                f"was released.")
    return None


@dataclass(frozen=True)
class StartDecision:
    """What a service's gate does now: ``go`` (take a slot), ``wait`` (poke again later) or ``skip`` (never start)."""

    action: str
    why: str


def start_decision(service: str, order: Sequence[str], states: Mapping[str, str], max_parallel: int) -> StartDecision:
    """Decide whether ``service`` may start its release now, from the task states of its release_all run.

    A service holds a slot from the moment its gate succeeds until its release task is done. Gates that ask at the
    same time take the free slots in release order: each computes the same ranking from the same states, so two gates
    that evaluate at once never both take the last slot (the later one sees the earlier still asking, or holding).
    """
    if service not in order:
        return StartDecision("skip", f"{service} is not in the manifest")
    failed = [s for s in order if states.get(RELEASE_PREFIX + s) == "failed"]
    if failed:
        return StartDecision("skip", f"not started after {', '.join(failed)} failed")
    holding = [s for s in order if states.get(START_PREFIX + s) == "success"
               and states.get(RELEASE_PREFIX + s, "none") not in DONE]
    asking = [s for s in order if states.get(START_PREFIX + s) in ASKING or s == service]
    free = max_parallel - len(holding)
    ahead = asking[:asking.index(service)]
    if len(ahead) < free:
        return StartDecision("go", f"slot {len(holding) + len(ahead) + 1} of {max_parallel}"
                                   + (f" (releasing: {', '.join(holding)})" if holding else ""))
    return StartDecision("wait", f"{len(holding)} of {max_parallel} slots held ({', '.join(holding) or 'none'})"
                                 + (f"; first in line: {', '.join(ahead)}" if ahead else ""))


@dataclass(frozen=True)
class ServiceOutcome:
    """How one service of the manifest ended: released, failed, rolled back or not attempted, and why."""

    service: str
    outcome: str
    why: str


def train_outcomes(order: Sequence[str], depends_on: Mapping[str, Sequence[str]], states: Mapping[str, str],
                   rolled_back: Mapping[str, bool]) -> list[ServiceOutcome]:
    """Say how each service of the manifest (in release order) ended.

    ``depends_on`` is the catalog's; ``rolled_back`` tells, for each service whose release failed, whether its
    release run undid everything (its ``verify_rollback`` passed).
    """
    failed = [s for s in order if states.get(RELEASE_PREFIX + s) == "failed"]
    outcomes = []
    for service in order:
        state = states.get(RELEASE_PREFIX + service, "none")
        if state == "success":
            outcomes.append(ServiceOutcome(service, RELEASED, "every stage passed"))
        elif state == "failed":
            outcomes.append(ServiceOutcome(service, ROLLED_BACK, "its release failed and was rolled back")
                            if rolled_back.get(service) else
                            ServiceOutcome(service, FAILED, "its release failed and its rollback did not finish (or "
                                                            "never started): read its run"))
        else:
            causes = [s for s in failed if s in _ancestors(service, depends_on)]
            if causes:
                why = f"depends on {', '.join(causes)} which failed"
            elif failed:
                why = f"not started after {', '.join(failed)} failed"
            else:
                why = f"its release task ended {state}"
            outcomes.append(ServiceOutcome(service, NOT_ATTEMPTED, why))
    return outcomes


def _ancestors(service: str, depends_on: Mapping[str, Sequence[str]]) -> set[str]:
    """Return every service that ``service`` depends on, directly or through others."""
    seen: set[str] = set()
    todo = list(depends_on.get(service, ()))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(depends_on.get(name, ()))
    return seen
