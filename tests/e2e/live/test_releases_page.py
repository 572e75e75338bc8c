"""The Releases app (#18) on the live Airflow's API server, mounted there by the plugin: the calendar answers every
catalog service to the admin, and nothing without a credential."""

from __future__ import annotations

import httpx
import pytest

from omnisphere_release.catalog import load_catalog

pytestmark = pytest.mark.e2e


def test_the_calendar_answers_the_catalogs_services_and_401_without_a_token(live_airflow):
    base = live_airflow.info["url"]
    # The live catalog is include/services.yaml with shorter bakes: the same services.
    names = load_catalog().names
    response = httpx.get(f"{base}/omnisphere/api/calendar", headers={"Authorization":
                                                                      live_airflow.headers["Authorization"]}, timeout=30)
    assert response.status_code == 200, response.text
    calendar = response.json()
    assert calendar["services"] == names and calendar["release_all"] is True
    assert {w["scope"] for w in calendar["windows"]} == {*names, "release_all"}
    for path in ("/omnisphere/api/calendar", "/omnisphere/releases"):
        assert httpx.get(f"{base}{path}", timeout=30).status_code == 401, path
