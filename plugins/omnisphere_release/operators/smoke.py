"""smoke_test: the catalog's critical endpoints answer as expected, retried with backoff within a deadline."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from omnisphere_release.catalog import load_catalog
from omnisphere_release.hooks.http import SmokeTestHook
from omnisphere_release.operators.common import ServiceStageOperator


class HttpSmokeTestOperator(ServiceStageOperator):
    """Probe the service's smoke_tests (status, JSON fields, latency budget); fail if they never all pass."""

    def execute(self, context: Context) -> dict[str, Any]:
        service = load_catalog().get(self.service, self.environment)
        http = SmokeTestHook(service.http_conn_id)
        self.log.info("Smoke-testing %s: %d endpoint(s) at %s, deadline %.0fs.", service.name,
                      len(service.smoke_tests), http.url_from_endpoint(""), service.smoke_deadline_seconds)
        results = http.probe_until_deadline(service.smoke_tests, service.smoke_deadline_seconds, service.name)
        failed = [r for r in results if not r.ok]
        if failed:
            raise AirflowFailException(
                f"Smoke test of {service.name} failed after {service.smoke_deadline_seconds:.0f}s: "
                + "; ".join(r.describe() for r in failed) + ". Next: the release rolls back.")
        self.log.info("Smoke test of %s passed. Next: monitoring_gate.", service.name)
        return {"endpoints": [r.describe() for r in results]}
