"""omni-release refuses bad input before calling Airflow, and says what to set."""

from __future__ import annotations

import io
from pathlib import Path

import yaml

from omnisphere_release import client

REPO = Path(__file__).resolve().parents[2]


def test_missing_url_is_exit_4_with_what_to_set(monkeypatch, capsys):
    monkeypatch.delenv("OMNI_AIRFLOW_URL", raising=False)
    assert client.main(["status", "release_auth-service/run"]) == client.EXIT_UNREACHABLE
    assert "OMNI_AIRFLOW_URL" in capsys.readouterr().err


def test_unknown_option_is_bad_input():
    assert client.main(["trigger", "auth-service", "--image-tag", "1", "--colour", "red"], out=io.StringIO()) == 2


def test_unreachable_airflow_is_exit_4(monkeypatch, capsys):
    monkeypatch.setenv("OMNI_AIRFLOW_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("OMNI_AIRFLOW_USERNAME", "admin")
    monkeypatch.setenv("OMNI_AIRFLOW_PASSWORD", "x")
    assert client.main(["status", "release_auth-service/run"]) == client.EXIT_UNREACHABLE
    assert "cannot reach Airflow" in capsys.readouterr().err


def test_example_ci_workflow_uses_the_cli_with_secrets_from_the_environment():
    workflow = yaml.safe_load((REPO / "examples" / "ci" / "github-actions-release.yml").read_text())
    step = workflow["jobs"]["release"]["steps"][-1]
    assert "omni-release" in step["run"] and "--wait" in step["run"]
    assert set(step["env"]) == {"OMNI_AIRFLOW_URL", "OMNI_AIRFLOW_USERNAME", "OMNI_AIRFLOW_PASSWORD"}
    assert "PASSWORD" not in step["run"]
