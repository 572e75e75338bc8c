"""release_all and queue_release refuse a manifest whose image was never pushed, or a max_parallel that is not a count,
before anything is released or queued.

(Their happy paths, the waves, max_parallel and a failure stopping the train need a scheduler, for release_all
triggers and waits for other DAGs: see tests/e2e/live/test_release_train.py.)
"""

from __future__ import annotations

import os
import uuid

import boto3
import pytest

from tests.e2e.helpers import push_image, run_dag

pytestmark = pytest.mark.e2e
SERVICES = ("auth-service", "billing-service", "notification-service")


def task_definitions() -> dict[str, str]:
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return {s["serviceName"]: s["taskDefinition"]
            for s in ecs.describe_services(cluster="omnisphere", services=list(SERVICES))["services"]}


def release_queue() -> dict:
    from airflow.models import Variable

    return Variable.get("omni_release_queue", default_var={}, deserialize_json=True)  # noqa: AIR311 - the metadata database itself, outside any task


def test_release_all_refuses_the_whole_manifest_when_one_image_was_never_pushed(devstack, airflow_db, capfd):
    pushed, missing = f"4.{uuid.uuid4().hex[:6]}", f"4.{uuid.uuid4().hex[:6]}"
    digest = push_image("auth-service", pushed)
    before = task_definitions()
    outcome = run_dag("release_all", {"manifest": {"auth-service": pushed, "billing-service": missing},
                                      "reason": "e2e: one image missing"})
    assert outcome.state == "failed", outcome.tasks
    assert outcome.task("check_manifest") == "failed"
    # auth-service comes first in release order: without the check it would have been released, then billing failed.
    assert outcome.task("start_auth-service") == "upstream_failed", outcome.tasks
    assert outcome.task("release_auth-service") == "upstream_failed", outcome.tasks
    assert outcome.task("summary") == "failed"
    assert task_definitions() == before
    log = capfd.readouterr().out
    assert "Refused the manifest before any release started; nothing was changed" in log
    assert f"billing-service: image omnisphere/billing-service:{missing} (ECR registry" in log
    assert f"auth-service: image 123456789012.dkr.ecr.eu-west-1.amazonaws.com/omnisphere/auth-service:{pushed} is in " \
           f"ECR ({digest})" in log


def test_release_all_refuses_a_max_parallel_that_is_not_a_count_naming_the_param(devstack, airflow_db):
    from airflow.sdk.exceptions import ParamValidationError

    before = task_definitions()
    for bad in (0, 51, "4"):
        with pytest.raises(ParamValidationError, match="max_parallel"):
            run_dag("release_all", {"manifest": {"auth-service": "1.0.0"}, "max_parallel": bad})
    assert task_definitions() == before


def test_queue_release_refuses_an_image_never_pushed_and_queues_it_once_pushed(devstack, airflow_db, capfd):
    tag = f"4.{uuid.uuid4().hex[:6]}"
    manifest = {"notification-service": tag}
    queue_before = release_queue()
    refused = run_dag("queue_release", {"manifest": manifest, "reason": "e2e"})
    assert refused.state == "failed" and refused.task("queue") == "failed"
    assert release_queue() == queue_before
    assert f"notification-service: image omnisphere/notification-service:{tag} (ECR registry" in \
        capfd.readouterr().out

    push_image("notification-service", tag)
    queued = run_dag("queue_release", {"manifest": manifest, "reason": "e2e"})
    assert queued.state == "success", queued.tasks
    window = queued.outputs["queue"]["window_start"]
    try:
        assert release_queue()[window]["manifest"] == manifest
    finally:
        from airflow.models import Variable

        Variable.set("omni_release_queue", queue_before, serialize_json=True)  # noqa: AIR311
