"""The smoke test's /version rule: every sampled answer must be the released image (by digest when both sides know
one), an answer from another image fails for good and names what answered, and a transport error may heal."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from omnisphere_release.catalog import SmokeTest
from omnisphere_release.hooks import http as http_module
from omnisphere_release.hooks.http import SmokeTestHook
from omnisphere_release.operators.smoke import version_problem

REPO = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/omnisphere/auth-service"
NEW_DIGEST = "sha256:" + "1" * 64
OLD_DIGEST = "sha256:" + "0" * 64
PLAN: Any = {"image_tag": "2.4.1", "target_image": f"{REPO}@{NEW_DIGEST}",
                        "target_image_digest": NEW_DIGEST}
BY_TAG: Any = {"image_tag": "2.4.1", "target_image": f"{REPO}:2.4.1", "target_image_digest": None}


@pytest.mark.parametrize(("body", "plan", "problem"), [
    ({"image": f"{REPO}@{NEW_DIGEST}", "version": "2.4.1"}, PLAN, None),
    ({"image": f"{REPO}@{OLD_DIGEST}", "version": "2.4.1"}, PLAN, f"answered {REPO}@{OLD_DIGEST}"),  # a rebuilt tag
    ({"image": f"{REPO}:1.0.0", "version": "1.0.0"}, PLAN, f"answered {REPO}:1.0.0"),
    ({"image": f"{REPO}:2.4.1"}, PLAN, None),  # the service knows no digest: its tag is what it can prove
    ({"digest": NEW_DIGEST}, PLAN, None),
    ({"digest": OLD_DIGEST, "version": "2.4.1"}, PLAN, f"answered {OLD_DIGEST}"),
    ({"image": f"{REPO}:2.4.1"}, BY_TAG, None),
    ({"image": f"{REPO}:2.4.0"}, BY_TAG, f"answered {REPO}:2.4.0"),
    ({"image": f"{REPO}@{NEW_DIGEST}"}, BY_TAG, f"answered {REPO}@{NEW_DIGEST}"),  # no digest planned, no tag seen
    ({"version": "2.4.1"}, BY_TAG, None),
    ({"version": "2.4.0"}, PLAN, "answered version 2.4.0"),
    ({"status": "ok"}, PLAN, "answered no image, digest or version"),
    ("2.4.1", PLAN, "answered no JSON object"),
    (None, PLAN, "answered no JSON object"),
])
def test_an_answer_is_the_released_image_or_names_what_answered(body, plan, problem):
    assert version_problem(body, plan) == problem


class Answer:
    def __init__(self, status: int, body: Any) -> None:
        self.status_code, self._body = status, body

    def json(self) -> Any:
        if isinstance(self._body, Exception):
            raise self._body
        return self._body


def scripted_hook(monkeypatch: pytest.MonkeyPatch, answers: list[Any]) -> tuple[SmokeTestHook, list[str]]:
    """A SmokeTestHook whose GETs answer from a script (an Answer, or an exception to raise), on a clock that moves
    only when it sleeps."""
    hook = SmokeTestHook("omni_http_test")  # its connection is never looked up: run() is scripted
    asked: list[str] = []

    def run(endpoint: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(endpoint)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    now = [0.0]
    monkeypatch.setattr(hook, "run", run)
    monkeypatch.setattr(http_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(http_module.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    return hook, asked


def new(n: int) -> list[Answer]:
    return [Answer(200, {"image": f"{REPO}@{NEW_DIGEST}"}) for _ in range(n)]


def old(n: int) -> list[Answer]:
    return [Answer(200, {"image": f"{REPO}:1.0.0"}) for _ in range(n)]


def judge(body: Any) -> str | None:
    return version_problem(body, PLAN)


def test_a_sample_passes_only_when_every_answer_is_the_released_image(monkeypatch):
    hook, asked = scripted_hook(monkeypatch, new(10))
    result = hook.sample("/version", 10, judge)
    assert result.ok and not result.final and asked == ["/version"] * 10
    assert result.describe().startswith("GET /version x10 -> 200 in ")


def test_an_old_task_answering_fails_the_sample_for_good_naming_it_and_how_often(monkeypatch):
    hook, _ = scripted_hook(monkeypatch, [*new(3), *old(1), *new(4), *old(2)])
    result = hook.sample("/version", 10, judge)
    assert not result.ok and result.final
    assert result.problem == f"answered {REPO}:1.0.0 (3 of 10)"


def test_transport_errors_and_error_statuses_fail_the_sample_but_may_heal(monkeypatch):
    hook, _ = scripted_hook(monkeypatch, [requests.ConnectionError("refused"), Answer(503, {}),
                                          Answer(200, ValueError("not json")), *new(2)])
    result = hook.sample("/version", 5, judge)
    assert not result.ok and not result.final
    assert result.problem == ("ConnectionError: refused (1 of 5); status 503 (1 of 5); "
                              "answered no JSON object (1 of 5)")


VERSION_CHECK = SmokeTest(path="/version", expect_fields=("image",))


def test_probing_stops_at_the_first_round_an_old_image_answers(monkeypatch):
    hook, asked = scripted_hook(monkeypatch, [*new(1), *old(10), *new(100)])
    results = hook.probe_until_deadline([VERSION_CHECK], 30, "auth-service",
                                        also=lambda: [hook.sample("/version", 10, judge)])
    assert [r.ok for r in results] == [True, False]
    assert len(asked) == 11  # one round: no second chance to miss the old task


def test_probing_retries_a_round_whose_only_fault_may_heal(monkeypatch):
    hook, asked = scripted_hook(monkeypatch, [*new(1), requests.ConnectionError("reset"), *new(9), *new(11)])
    results = hook.probe_until_deadline([VERSION_CHECK], 30, "auth-service",
                                        also=lambda: [hook.sample("/version", 10, judge)])
    assert all(r.ok for r in results) and len(asked) == 22
