"""Probe a service's HTTP endpoints the way its clients see them, through its Airflow HTTP connection."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import requests
from airflow.providers.http.hooks.http import HttpHook

from omnisphere_release.catalog import SmokeTest

PROBE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class ProbeResult:
    path: str
    ok: bool
    status: int | None
    latency_ms: float
    problem: str = ""
    final: bool = False  # a failure that no later round can undo (an old image answered): stop probing

    def describe(self) -> str:
        state = "ok" if self.ok else f"FAILED: {self.problem}"
        answer = self.status if self.status is not None else "no answer"
        return f"GET {self.path} -> {answer} in {self.latency_ms:.0f} ms, {state}"


# Keys of the HTTP connection's extra that name the load balancer's test listener (blue/green): a URL, or a port on the
# connection's own scheme and host. HttpHook sends the extra's other keys as headers: these are taken out.
TEST_LISTENER_KEYS = ("test_listener_url", "test_listener_port")


def listener_base_url(base_url: str, extra: dict[str, Any], conn_id: str) -> str:
    """Return the base URL of the test listener the connection's extra names (``test_listener_url``, or
    ``test_listener_port`` on the connection's scheme and host); raise ValueError saying what to add if none."""
    if extra.get("test_listener_url"):
        return str(extra["test_listener_url"]).rstrip("/")
    port = extra.get("test_listener_port")
    if port in (None, ""):
        raise ValueError(f"HTTP connection {conn_id} names no test listener: add test_listener_port (the load "
                         f"balancer's test listener on the same host) or test_listener_url to its extra")
    try:
        number = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"HTTP connection {conn_id}: extra test_listener_port {port!r} is not a port number") from None
    parsed = urlparse(base_url)
    return f"{parsed.scheme}://{parsed.hostname}:{number}"


class SmokeTestHook(HttpHook):
    """GET a service's smoke-test endpoints (HttpHook: the connection's scheme, host, port, auth and headers), on the
    production listener, or with ``listener="test"`` on the test listener its extra names (blue/green: only the new
    task set answers there before the production switch)."""

    def __init__(self, http_conn_id: str, listener: str = "production") -> None:
        super().__init__(method="GET", http_conn_id=http_conn_id)
        self.listener = listener

    def _set_base_url(self, connection: Any) -> None:
        super()._set_base_url(connection)
        if self.listener == "test":
            self.base_url = listener_base_url(self.base_url, connection.extra_dejson, self.http_conn_id)

    def get_conn(self, headers: dict[Any, Any] | None = None, extra_options: dict[str, Any] | None = None) -> Any:
        session = super().get_conn(headers, extra_options)
        for key in TEST_LISTENER_KEYS:
            session.headers.pop(key, None)
        return session

    def probe(self, check: SmokeTest) -> ProbeResult:
        """GET ``check.path`` and compare status, JSON fields and latency with the check's expectations."""
        started = time.monotonic()
        try:
            response = self.run(check.path, extra_options={"check_response": False, "timeout": PROBE_TIMEOUT_SECONDS})
        except requests.RequestException as exc:
            return ProbeResult(check.path, False, None, (time.monotonic() - started) * 1000,
                               f"{type(exc).__name__}: {exc}")
        latency_ms = (time.monotonic() - started) * 1000
        problems = []
        if response.status_code != check.expect_status:
            problems.append(f"status {response.status_code}, expected {check.expect_status}")
        body: Any = None
        if check.expect_json or check.expect_fields:
            try:
                body = response.json()
            except ValueError:
                problems.append("body is not JSON")
        if isinstance(body, dict):
            for field, value in check.expect_json.items():
                if body.get(field) != value:
                    problems.append(f"{field}={body.get(field)!r}, expected {value!r}")
            problems += [f"field {field!r} missing" for field in check.expect_fields if field not in body]
        if latency_ms > check.latency_budget_ms:
            problems.append(f"latency {latency_ms:.0f} ms over the {check.latency_budget_ms} ms budget")
        return ProbeResult(check.path, not problems, response.status_code, latency_ms, "; ".join(problems))

    def sample(self, path: str, count: int, judge: Callable[[Any], str | None]) -> ProbeResult:
        """GET ``path`` ``count`` times (a load balancer spreads them over the tasks); ok when ``judge`` finds no
        problem in any JSON answer. The problem counts each distinct wrong answer: ``judge`` names what answered.

        A JSON object ``judge`` rejects makes the result final: a task answered it after the switch, and another round
        would only miss it by chance. Transport errors, error statuses and bodies that are no JSON object may heal in
        a later round."""
        started = time.monotonic()
        problems: Counter[str] = Counter()
        judged_wrong = False
        status: int | None = None
        for _ in range(count):
            try:
                response = self.run(path, extra_options={"check_response": False, "timeout": PROBE_TIMEOUT_SECONDS})
            except requests.RequestException as exc:
                problems[f"{type(exc).__name__}: {exc}"] += 1
                continue
            status = response.status_code
            try:
                body: Any = response.json()
            except ValueError:
                body = None
            if response.status_code >= 400:
                problems[f"status {response.status_code}"] += 1
            elif problem := judge(body):
                problems[problem] += 1
                judged_wrong = judged_wrong or isinstance(body, dict)  # the task's own word, not a proxy's page
        latency_ms = (time.monotonic() - started) * 1000
        wrong = sum(problems.values())
        summary = "; ".join(f"{problem} ({n} of {count})" for problem, n in problems.most_common())
        return ProbeResult(f"{path} x{count}", not wrong, status, latency_ms, summary, final=judged_wrong)

    def probe_until_deadline(self, checks: Sequence[SmokeTest], deadline_seconds: float, what: str,
                             also: Callable[[], list[ProbeResult]] | None = None) -> list[ProbeResult]:
        """Probe every endpoint (and whatever ``also`` probes) until one round passes entirely or the deadline
        passes; return the last round.

        A new revision may take a few seconds to answer everywhere: rounds back off from 0.5 s to 8 s.
        """
        deadline = time.monotonic() + deadline_seconds
        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            results = [self.probe(check) for check in checks]
            if also is not None and all(r.ok for r in results):
                results += also()
            failed = [r for r in results if not r.ok]
            if not failed:
                self.log.info("Smoke round %d of %s passed: %s", attempt, what, "; ".join(r.describe() for r in results))
                return results
            self.log.warning("Smoke round %d of %s: %d of %d endpoint(s) failed: %s", attempt, what, len(failed),
                             len(results), "; ".join(r.describe() for r in failed))
            if time.monotonic() + delay > deadline or any(r.final for r in failed):
                return results
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
