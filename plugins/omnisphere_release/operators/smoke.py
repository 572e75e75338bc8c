"""smoke_test: the catalog's critical endpoints answer as expected, retried with backoff within a deadline."""

from __future__ import annotations

import time
from typing import Any

import httpx
from airflow.sdk.exceptions import AirflowFailException

from omnisphere_release.catalog import Service, load_catalog
from omnisphere_release.hooks.http import ProbeResult, base_url_of, probe
from omnisphere_release.operators.common import ServiceStageOperator


def smoke_until_deadline(service: Service, log: Any, deadline_seconds: float | None = None) -> list[ProbeResult]:
    """Probe every endpoint until one round passes entirely or the deadline passes; return the last round."""
    base_url = base_url_of(service.http_conn_id)
    deadline = time.monotonic() + (deadline_seconds or service.smoke_deadline_seconds)
    delay, attempt = 0.5, 0
    with httpx.Client(timeout=5.0) as client:
        while True:
            attempt += 1
            results = [probe(client, base_url, check) for check in service.smoke_tests]
            failed = [r for r in results if not r.ok]
            if not failed:
                log.info("Smoke round %d of %s passed: %s", attempt, service.name,
                         "; ".join(r.describe() for r in results))
                return results
            log.warning("Smoke round %d of %s: %d of %d endpoint(s) failed: %s", attempt, service.name, len(failed),
                        len(results), "; ".join(r.describe() for r in failed))
            if time.monotonic() + delay > deadline:
                return results
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


class HttpSmokeTestOperator(ServiceStageOperator):
    """Probe the service's smoke_tests (status, JSON fields, latency budget); fail if they never all pass."""

    def execute(self, context: Any) -> dict[str, Any]:
        service = load_catalog().get(self.service)
        self.log.info("Smoke-testing %s: %d endpoint(s) at %s, deadline %.0fs.", service.name,
                      len(service.smoke_tests), base_url_of(service.http_conn_id), service.smoke_deadline_seconds)
        results = smoke_until_deadline(service, self.log)
        failed = [r for r in results if not r.ok]
        if failed:
            raise AirflowFailException(
                f"Smoke test of {service.name} failed after {service.smoke_deadline_seconds:.0f}s: "
                + "; ".join(r.describe() for r in failed) + ". Next: the release rolls back.")
        self.log.info("Smoke test of %s passed. Next: monitoring_gate.", service.name)
        return {"endpoints": [r.describe() for r in results]}
