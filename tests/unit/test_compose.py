"""docker-compose.yaml cannot start here (no Docker engine): check what can be checked by reading it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def test_the_airflow_3_parts_are_present_with_healthchecks():
    services = compose()["services"]
    for name in ("postgres", "redis", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-triggerer", "airflow-worker", "airflow-init"):
        assert name in services, name
    for name in ("postgres", "redis", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-triggerer", "airflow-worker"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def test_mounted_project_paths_exist():
    common = compose()["x-airflow-common"]
    for volume in common["volumes"]:
        source = volume.split(":", 1)[0]
        assert (REPO / source).exists(), f"{source} is mounted but missing"


def test_image_pins_the_airflow_version_of_requirements():
    pinned = re.search(r"apache-airflow==([\d.]+)", (REPO / "requirements.txt").read_text()).group(1)
    assert f"AIRFLOW_VERSION={pinned}" in (REPO / "Dockerfile").read_text()
    assert compose()["x-airflow-common"]["image"].endswith(pinned)


def test_published_ports_bind_loopback_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
