"""The live Airflow shared by the tests of this package (the REST API, the CLI and the UI): starting one takes about a
minute, so it starts once for the package, and stops when the package is done so that its scheduler does not run
beside the other tests."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="package")
def live_airflow(devstack, secret_watch):
    from devstack import airflow_server
    from devstack.net import free_port

    home = Path(tempfile.mkdtemp(prefix="omni-live-airflow-"))
    catalog = yaml.safe_load((REPO / "include" / "services.yaml").read_text())
    for service in catalog["services"]:
        service["deploy"]["bake_minutes"] = 0.1
        service["smoke_deadline_seconds"] = 4
        # auth and billing are independent here (notification still waits for both), so that a release train has
        # two releases to run at once; the real catalog is a strict chain.
        if service["name"] == "billing-service":
            service["depends_on"] = []
    # A release_all window every minute, so that a test sees scheduled runs take (or not) a queued manifest.
    catalog["release_all_window"] = {"cron": "* * * * *", "duration_minutes": 1, "timezone": "UTC"}
    (home / "services.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    port = free_port()
    extra = {"OMNISPHERE_CATALOG": str(home / "services.yaml"),
             "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
             "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port())}
    info = airflow_server.start(devstack, home, port, extra_env=extra)
    token = httpx.post(f"{info['url']}/auth/token", json={"username": info["username"],
                                                          "password": info["password"]}).json()["access_token"]
    client = httpx.Client(base_url=f"{info['url']}/api/v2", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    deadline = time.monotonic() + 120
    while client.get("/dags/release_all").status_code != 200:
        assert time.monotonic() < deadline, "the DAG processor did not parse the DAGs in time"
        time.sleep(2)
    client.info = info  # type: ignore[attr-defined]  # url, username, password for the CLI tests
    client.home = home  # type: ignore[attr-defined]  # its ports and logs
    try:
        yield client
    finally:
        client.close()
        airflow_server.stop(home)
        secret_watch.scan_logs("live Airflow log", home / "logs", home / "standalone.log")
        shutil.rmtree(home, ignore_errors=True)
