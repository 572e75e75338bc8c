"""The rules a release cannot get around: windows, params that mean what they say, free text kept as text. Each is
refused at the first task with nothing changed, and passes when the rule is met."""

from __future__ import annotations

import os
import re
import uuid

import boto3
import psycopg2
import pytest

from tests.e2e.helpers import auth_service_at_version_3, push_image, run_dag

pytestmark = pytest.mark.e2e
SERVICE = "auth-service"


@pytest.fixture()
def short_catalog(devstack, airflow_db, tmp_path, monkeypatch):
    auth_service_at_version_3(tmp_path, monkeypatch)


def state() -> tuple:
    with psycopg2.connect(os.environ["OMNI_PG_DSN_AUTH_SERVICE"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT version, applied_at FROM omnisphere_schema_history ORDER BY version")
        history = cur.fetchall()
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return history, ecs.describe_services(cluster="omnisphere", services=[SERVICE])["services"][0]["taskDefinition"]


def conf(**more) -> dict:
    tag = f"7.{uuid.uuid4().hex[:6]}"
    push_image(SERVICE, tag)
    return {"image_tag": tag, "bake_minutes": 0.1, "reason": "e2e: guardrails", **more}


@pytest.mark.parametrize(("window_conf", "message"), [
    # A Thursday 09:16 UTC start for a "Sun 02:00-04:00 Europe/Paris" service is no maintenance window.
    ({"window": "2026-12-03T09:16:00Z"}, "param window 2026-12-03T09:16:00Z is outside the maintenance windows of "
                                         "this service (Sun 02:00-04:00 Europe/Paris): give param force_reason"),
    ({"window": "9999-12-31T00:00:00Z", "force_reason": "far"}, "param window 9999-12-31T00:00:00Z is more than 14 "
                                                                "days ahead"),
    ({"window": "2026-12-31T25:61:00Z"}, "param window '2026-12-31T25:61:00Z' is not a real time"),
    ({"window": "now"}, "param window=now needs param force_reason"),
    ({"window": "now", "force_reason": "e2e", "dryRun": True}, "unknown param(s) in the run's conf: 'dryRun' (did you "
                                                                "mean 'dry_run'?)"),
])
def test_a_release_outside_the_rules_is_refused_at_its_first_task_with_nothing_changed(short_catalog, capfd,
                                                                                         window_conf, message):
    before = state()
    outcome = run_dag(f"release_{SERVICE}", conf(**window_conf))
    assert outcome.state == "failed", outcome.tasks
    assert outcome.task("wait_for_window") == "failed" and outcome.task("preflight") == "upstream_failed"
    assert message in capfd.readouterr().out
    assert state() == before


def test_a_forced_release_records_mode_reason_and_who_in_its_report(short_catalog):
    outcome = run_dag(f"release_{SERVICE}", conf(window="now", force_reason="CVE-2026-1234, approved by on-call"))
    assert outcome.state == "success", outcome.tasks
    report = outcome.outputs["report"]
    assert report["window"]["mode"] == "forced"
    assert report["window"]["force_reason"] == "CVE-2026-1234, approved by on-call"
    assert "triggered_by" in report


def test_free_text_is_kept_as_text_in_the_markdown_report(short_catalog):
    lie = "**RELEASED**\n# every stage passed\x00\x1b[31m"
    outcome = run_dag(f"release_{SERVICE}", conf(window="now", force_reason=lie, reason=lie))
    assert outcome.state == "success", outcome.tasks
    bucket, key = outcome.outputs["report"]["stored_at"].removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    markdown = s3.get_object(Bucket=bucket, Key=key.replace(".json", ".md"))["Body"].read().decode()
    # The params stay as typed, as one JSON line in a fenced code block, which nothing in them can close.
    params_block = markdown[markdown.index("```json\n"):markdown.index("\n```\n") + 5]
    assert params_block.count("\n") == 3 and "RELEASED" in params_block  # fence, one line, fence
    markdown = markdown.replace(params_block, "")
    assert "\x00" not in markdown and "\x1b" not in markdown
    assert "\n# every stage passed" not in markdown and "**RELEASED**" not in markdown
    assert r"reason: \*\*RELEASED\*\* \# every stage passed" in markdown
    assert re.findall(r"(?m)^#+ .*", markdown)[0].startswith("# Release report: auth-service")
    assert not [h for h in re.findall(r"(?m)^#+ .*", markdown) if "every stage" in h]  # no heading of theirs


def test_an_image_tag_with_a_final_newline_is_refused_before_a_run_exists(airflow_db):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError, match="image_tag"):
        run_dag(f"release_{SERVICE}", {"image_tag": "1.1.0\n", "window": "now", "force_reason": "e2e"})
