"""Access through the live API with production's FAB auth manager: the roles synced from the catalog decide who may
trigger which DAG, who may force a production window, and what omni-release says when refused.

It is a module of its own (not under tests/e2e/live/): it needs no live_airflow, so it may run on the other xdist
worker, beside the live Airflow's tests."""

from __future__ import annotations

import io
import subprocess
import sys

import httpx
import pytest

from omnisphere_release import client
from tests.e2e.live.fab_airflow import FabAirflow, fab_airflow  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e
TRIGGER = {"logical_date": None, "conf": {"image_tag": "1.0.0"}}
FORCED = {"image_tag": "1.0.0", "environment": "production", "window": "now", "force_reason": "hotfix for an outage"}


def test_a_team_triggers_and_clears_its_own_services_only(fab_airflow: FabAirflow):  # noqa: F811
    assert httpx.get(f"{fab_airflow.url}/api/v2/dags", timeout=30).status_code == 401  # nobody without a token
    with fab_airflow.client("identity-release") as identity:
        refused = identity.post("/dags/release_billing-service/dagRuns", json=TRIGGER)
        assert refused.status_code == 403, refused.text
        allowed = identity.post("/dags/release_auth-service/dagRuns", json=TRIGGER)
        assert allowed.status_code == 200, allowed.text
        assert allowed.json()["triggering_user_name"] == "identity-release"
        assert identity.post("/dags/release_all/dagRuns", json={"logical_date": None}).status_code == 403
        clear = {"dry_run": True, "only_failed": False}
        assert identity.post("/dags/rollback_auth-service/clearTaskInstances", json=clear).status_code == 200
        assert identity.post("/dags/rollback_billing-service/clearTaskInstances", json=clear).status_code == 403
        # It reads its team's DAGs, and no other's.
        visible = {dag["dag_id"] for dag in identity.get("/dags", params={"limit": 100}).json()["dags"]}
        assert visible == {"release_auth-service", "rollback_auth-service"}
        assert identity.get("/dags/release_billing-service/dagRuns").status_code == 403


def test_a_viewer_reads_every_dag_and_triggers_none(fab_airflow: FabAirflow):  # noqa: F811
    with fab_airflow.client("viewer") as viewer:
        dags = [dag["dag_id"] for dag in viewer.get("/dags", params={"limit": 100}).json()["dags"]]
        assert {"release_all", "queue_release", "release_auth-service", "rollback_billing-service"} <= set(dags)
        assert viewer.get("/dags/release_auth-service/dagRuns").status_code == 200
        statuses = {dag_id: viewer.post(f"/dags/{dag_id}/dagRuns", json=TRIGGER).status_code for dag_id in dags}
        assert set(statuses.values()) == {403}, statuses
        # The UI finds the Releases page among the plugins, and the page's API answers.
        assert "omnisphere_release" in {plugin["name"] for plugin in viewer.get("/plugins").json()["plugins"]}
        calendar = httpx.get(f"{fab_airflow.url}/omnisphere/api/calendar", headers=viewer.headers, timeout=30)
        assert calendar.status_code == 200, calendar.text


def test_only_a_release_manager_forces_a_production_window(fab_airflow: FabAirflow):  # noqa: F811
    with fab_airflow.client("identity-release") as identity:
        refused = identity.post("/dags/release_auth-service/dagRuns", json={"logical_date": None, "conf": FORCED})
        assert refused.status_code == 403, refused.text
        assert "release-manager" in refused.json()["detail"] and "identity-release" in refused.json()["detail"]
        # Outside production, forcing stays the team's call.
        staging = identity.post("/dags/release_auth-service/dagRuns", json={
            "logical_date": None, "conf": {**FORCED, "environment": "staging"}})
        assert staging.status_code == 200, staging.text
    with fab_airflow.client("release-manager") as manager:
        forced = manager.post("/dags/release_auth-service/dagRuns", json={"logical_date": None, "conf": FORCED})
        assert forced.status_code == 200, forced.text
        assert forced.json()["conf"]["window"] == "now"


def test_omni_release_exits_2_on_a_403_naming_the_permission_and_4_on_a_401(fab_airflow: FabAirflow,  # noqa: F811
                                                                             monkeypatch, capsys):
    monkeypatch.setenv("OMNI_AIRFLOW_URL", fab_airflow.url)
    monkeypatch.delenv("OMNI_AIRFLOW_TOKEN", raising=False)
    monkeypatch.setenv("OMNI_AIRFLOW_USERNAME", "identity-release")
    monkeypatch.setenv("OMNI_AIRFLOW_PASSWORD", fab_airflow.users["identity-release"]["password"])
    out = io.StringIO()
    assert client.main(["trigger", "billing-service", "--image-tag", "1.0.0"], out=out) == client.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "HTTP 403" in error and "can_edit on DAG:release_billing-service" in error, error
    assert client.main(["trigger", "auth-service", "--image-tag", "1.0.0"], out=out) == client.EXIT_OK
    assert "Triggered release_auth-service/" in out.getvalue()
    monkeypatch.setenv("OMNI_AIRFLOW_PASSWORD", "not-the-password")
    assert client.main(["trigger", "auth-service", "--image-tag", "1.0.0"], out=out) == client.EXIT_UNREACHABLE
    assert "refused the credentials" in capsys.readouterr().err
    monkeypatch.setenv("OMNI_AIRFLOW_TOKEN", "not.a.token")
    assert client.main(["status", "release_auth-service/x"], out=out) == client.EXIT_UNREACHABLE
    assert "refused the credentials" in capsys.readouterr().err


def test_the_sync_changes_nothing_the_second_time_and_says_so(fab_airflow: FabAirflow):  # noqa: F811
    """The fixture synced the roles, then the API server started (and ran FAB's own sync of its roles): a second
    sync finds nothing to change."""
    result = subprocess.run([sys.executable, "-m", "omnisphere_release.access", "sync"], env=fab_airflow.env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing to change, the database matches the catalog" in result.stdout, result.stdout
    assert "role " not in result.stdout  # no role changed
