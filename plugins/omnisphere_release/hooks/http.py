"""Probe a service's HTTP endpoints the way its clients see them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class ProbeResult:
    path: str
    ok: bool
    status: int | None
    latency_ms: float
    problem: str = ""

    def describe(self) -> str:
        state = "ok" if self.ok else f"FAILED: {self.problem}"
        return f"GET {self.path} -> {self.status if self.status is not None else 'no answer'} in {self.latency_ms:.0f} ms, {state}"


def base_url_of(http_conn_id: str) -> str:
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(http_conn_id)
    # As HttpHook does: the scheme may sit in the connection's schema field; plain http otherwise.
    scheme = conn.schema if conn.schema in ("http", "https") else ("https" if conn.conn_type == "https" else "http")
    host = conn.host or ""
    if "://" in host:
        return host.rstrip("/")
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{host}{port}"


def probe(client: httpx.Client, base_url: str, check: Any) -> ProbeResult:
    """GET ``check.path`` and compare status, JSON fields and latency with the check's expectations."""
    started = time.monotonic()
    try:
        response = client.get(base_url + check.path)
    except httpx.HTTPError as exc:
        return ProbeResult(check.path, False, None, (time.monotonic() - started) * 1000, f"{type(exc).__name__}: {exc}")
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
