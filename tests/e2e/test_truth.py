"""A green release is a true release: finalize compares what runs now with what the run deployed and migrated, and
verify_rollback with the state before it. A change made behind the release's back fails it, named."""

from __future__ import annotations

import logging
import os
import uuid

import boto3
import pytest

from tests.e2e.helpers import auth_service_at_version_3, push_image, run_dag

pytestmark = pytest.mark.e2e
SERVICE = "auth-service"


@pytest.fixture()
def auth_at_version_3(devstack, airflow_db, tmp_path, monkeypatch):
    return auth_service_at_version_3(tmp_path, monkeypatch)


def release(**conf):
    tag = f"6.{uuid.uuid4().hex[:6]}"
    push_image(SERVICE, tag)
    return run_dag(f"release_{SERVICE}", {"image_tag": tag, "bake_minutes": 0.1, "window": "now",
                                          "force_reason": "e2e: truth", **conf})


def behind_the_release_s_back(monkeypatch, change):
    """Run ``change`` once the bake passed, just before finalize looks: a person or a tool acting meanwhile."""
    from omnisphere_release.operators.monitoring import CloudWatchMonitoringGateOperator

    original = CloudWatchMonitoringGateOperator.execute_complete

    def then_change(self, context, event):
        result = original(self, context, event)
        change()
        return result

    monkeypatch.setattr(CloudWatchMonitoringGateOperator, "execute_complete", then_change)


def test_a_schema_reverted_behind_the_release_s_back_fails_finalize_naming_who(auth_at_version_3, monkeypatch,
                                                                                 capfd):
    migrate = auth_at_version_3
    refused: list[int] = []

    def revert_behind_the_back() -> None:
        # omni-migrate itself is refused: the release holds the service's lease. Someone with the engine's library
        # (or psql) is not, and that is what finalize must catch.
        refused.append(migrate([SERVICE, "down", "--to", "3", "--reason", "on-call revert"]))
        from omnisphere_release.catalog import load_catalog
        from omnisphere_release.hooks.postgres import schema_engine

        catalog = load_catalog()
        schema_engine(catalog.get(SERVICE), catalog, "cli", logging.getLogger("on-call")).migrate(
            "down", 3, reason="on-call revert")

    behind_the_release_s_back(monkeypatch, revert_behind_the_back)
    outcome = release()
    assert refused == [2]
    assert outcome.state == "failed", outcome.tasks
    assert outcome.task("monitoring_gate") == "success" and outcome.task("finalize") == "failed"
    assert outcome.outputs["report"]["outcome"] != "released"
    log = capfd.readouterr().out
    assert "The release is not what runs now, so it is not released" in log
    assert "the schema of auth-service is at version 3, not 4 (version 4 is not applied: reverted by cli" in log
    assert "(on-call revert)" in log


def test_a_revision_deployed_behind_the_release_s_back_fails_finalize(auth_at_version_3, monkeypatch, capfd):
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])

    def deploy_by_hand() -> None:
        live = ecs.describe_services(cluster="omnisphere", services=[SERVICE])["services"][0]
        current = ecs.describe_task_definition(taskDefinition=live["taskDefinition"])["taskDefinition"]
        fields = {k: current[k] for k in ("family", "containerDefinitions", "networkMode", "requiresCompatibilities",
                                          "cpu", "memory") if current.get(k)}
        by_hand = ecs.register_task_definition(**fields)["taskDefinition"]["taskDefinitionArn"]
        ecs.update_service(cluster="omnisphere", service=SERVICE, taskDefinition=by_hand)
        deployed.append(by_hand)

    deployed: list[str] = []
    behind_the_release_s_back(monkeypatch, deploy_by_hand)
    outcome = release()
    assert outcome.state == "failed" and outcome.task("finalize") == "failed", outcome.tasks
    log = capfd.readouterr().out
    assert f"auth-service runs {deployed[0]}, not " in log
    assert "not registered by a release run (deployed by hand, or by another tool)" in log


def test_a_true_release_is_green_and_says_what_it_verified(auth_at_version_3):
    outcome = release()
    assert outcome.state == "success", outcome.tasks
    assert outcome.outputs["finalize"]["schema_version"] == 4
    assert outcome.outputs["finalize"]["task_definition"] == outcome.outputs["ecs_deploy"]["task_definition"]
