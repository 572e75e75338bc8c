"""The live Airflow shared by the tests of this package (the REST API, the CLI and the UI): starting one takes about a
minute, so it starts once for the package, and stops when the package is done so that its scheduler does not run
beside the other tests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
# A second user of the live Airflow, who approves what the admin triggers (four eyes); role "user" may answer
# human-in-the-loop requests of the DAGs. Both passwords are generated into the file the simple auth manager reads.
APPROVER = "approver"
# An environment with staging's databases, cluster and buckets that requires an approver: the four-eyes rule is keyed on
# the environment's approval flag, so releasing there is releasing under production's rule.
APPROVAL_ENVIRONMENT = "preprod"


@pytest.fixture(scope="package")
def live_airflow(devstack, secret_watch):
    from devstack import airflow_server
    from devstack.net import free_port

    home = Path(tempfile.mkdtemp(prefix="omni-live-airflow-"))
    catalog = yaml.safe_load((REPO / "include" / "services.yaml").read_text())
    for service in catalog["services"]:
        service["deploy"]["bake_minutes"] = 0.1
        # notification-service keeps the catalog's canary steps (10 % for 2 min, 100 % for 5 min: 2 s and 5 s in the
        # devstack's ECS), shorter than the scheduler's hand-offs and the stages before monitoring_gate: ECS completes
        # the deployment before the gate looks, which the gate must not take for a failure (it bakes at 100 %).
        service["smoke_deadline_seconds"] = 4
        # auth and billing are independent here (notification still waits for both), so that a release train has
        # two releases to run at once; the real catalog is a strict chain.
        if service["name"] == "billing-service":
            service["depends_on"] = []
        if service["name"] == "auth-service":  # the admin triggers, so the approver is the one who may answer
            service["approvers"] = [airflow_server.ADMIN_USER, APPROVER]
    # A release_all window every minute, so that a test sees scheduled runs take (or not) a queued manifest.
    catalog["release_all_window"] = {"cron": "* * * * *", "duration_minutes": 1, "timezone": "UTC"}
    staging = catalog["environments"][catalog["default_environment"]]
    catalog["environments"][APPROVAL_ENVIRONMENT] = {**staging, "approval": True, "approval_timeout_hours": 1}
    (home / "services.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    passwords = {airflow_server.ADMIN_USER: secrets.token_urlsafe(12), APPROVER: secrets.token_urlsafe(12)}
    password_file = home / "simple_auth_manager_passwords.json.generated"
    password_file.write_text(json.dumps(passwords))
    password_file.chmod(0o600)
    port = free_port()
    extra = {"OMNISPHERE_CATALOG": str(home / "services.yaml"),
             "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{airflow_server.ADMIN_USER}:admin,{APPROVER}:user",
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
    info["approver"] = {"username": APPROVER, "password": passwords[APPROVER]}
    client.info = info  # type: ignore[attr-defined]  # url, username, password (and the approver's) for the CLI tests
    client.home = home  # type: ignore[attr-defined]  # its ports and logs
    try:
        yield client
    finally:
        client.close()
        airflow_server.stop(home)
        secret_watch.scan_logs("live Airflow log", home / "logs", home / "standalone.log")
        if keep := os.environ.get("OMNI_KEEP_LIVE_LOGS"):  # a folder to copy the live Airflow's home (its logs) to
            shutil.copytree(home, Path(keep) / home.name, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("*.sock", "*.pid"))
        shutil.rmtree(home, ignore_errors=True)
