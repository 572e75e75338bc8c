"""The devstack's one-off ECS tasks (devstack/ecs_tasks.py), through boto3 against moto with the simulator installed:
a suite task starts PENDING, runs, writes its lines to CloudWatch Logs and stops with the exit code its image under
test calls for; StopTask kills it; the catalog's suites are registered and run in both environments' clusters."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from devstack import ecr, ecs_tasks
from devstack.aws import IMAGE_REPOSITORY, REGION, MotoEndpoint, push_image
from devstack.sample_services import SampleService
from omnisphere_release.catalog import load_catalog

pytestmark = pytest.mark.integration
STEP_SECONDS = 0.05
SUITE = "auth-service-regression"


@pytest.fixture(scope="module")
def aws() -> Iterator[dict[str, Any]]:
    """moto on a free loopback port, with ECR's digests and the one-off task simulator installed."""
    catalog = load_catalog()
    ecr.install()
    ecs_tasks.install(catalog, step_seconds=STEP_SECONDS)
    moto = MotoEndpoint("127.0.0.1", 0)
    moto.start()
    session = boto3.session.Session(aws_access_key_id="local-only", aws_secret_access_key="local-only",  # noqa: S106
                                    region_name=REGION)
    endpoint = f"http://127.0.0.1:{moto.port}"
    clients = {name: session.client(name, endpoint_url=endpoint) for name in ("ecs", "logs", "ecr")}
    for cluster in ("omnisphere", "omnisphere-production"):
        clients["ecs"].create_cluster(clusterName=cluster)
    clients["ecr"].create_repository(repositoryName="omnisphere/auth-service")
    try:
        yield clients
    finally:
        moto.stop()


@pytest.fixture(scope="module")
def service_url() -> Iterator[str]:
    """The devstack's sample service, standing in for the service under test: /version names its image."""
    sample = SampleService("auth-service", lambda: f"{IMAGE_REPOSITORY}/auth-service:2.0.0")
    sample.start()
    try:
        yield f"http://127.0.0.1:{sample.port}"
    finally:
        sample.stop()


def run_suite(ecs: Any, image: str, url: str | None, cluster: str = "omnisphere", started_by: str = "test") -> str:
    environment = [{"name": "OMNI_RELEASE_IMAGE", "value": image}]
    if url:
        environment.append({"name": "OMNI_SERVICE_URL", "value": url})
    response = ecs.run_task(cluster=cluster, taskDefinition=SUITE, launchType="FARGATE", startedBy=started_by,
                            overrides={"containerOverrides": [{"name": "regression", "environment": environment}]})
    assert response["failures"] == []
    [task] = response["tasks"]
    assert (task["lastStatus"], task["desiredStatus"], task["containers"][0]["lastStatus"]) == (
        "PENDING", "RUNNING", "PENDING")  # as ECS answers RunTask
    return task["taskArn"]


def lines_of(logs: Any, arn: str) -> list[str]:
    stream = f"regression/regression/{arn.rsplit('/', 1)[-1]}"
    try:
        events = logs.get_log_events(logGroupName="/ecs/auth-service", logStreamName=stream, startFromHead=True)
    except logs.exceptions.ResourceNotFoundException:
        return []
    return [event["message"] for event in events["events"]]


def wait_until_stopped(aws: dict[str, Any], arn: str, cluster: str = "omnisphere") -> tuple[dict, list[str], list[str]]:
    """Poll as a client does; return the stopped task, the statuses seen, and the log lines seen when it stopped."""
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        task = aws["ecs"].describe_tasks(cluster=cluster, tasks=[arn])["tasks"][0]
        lines = lines_of(aws["logs"], arn)  # read right after the state, as the trigger does
        if not seen or seen[-1] != task["lastStatus"]:
            seen.append(task["lastStatus"])
        if task["lastStatus"] == "STOPPED":
            return task, seen, lines
        time.sleep(STEP_SECONDS / 2)
    raise AssertionError(f"task {arn} did not stop within 10s; statuses seen: {seen}")


def test_a_suite_against_a_good_image_passes_and_logs_before_it_stops(aws, service_url):
    arn = run_suite(aws["ecs"], f"{IMAGE_REPOSITORY}/auth-service:2.0.0", service_url)
    task, seen, lines = wait_until_stopped(aws, arn)
    # In this order (a slow poll on a busy machine may miss a state, never reorder them).
    assert seen == [state for state in ("PENDING", "RUNNING", "STOPPED") if state in seen]
    assert task["desiredStatus"] == "STOPPED" and task["stopCode"] == "EssentialContainerExited"
    assert [(c["name"], c["lastStatus"], c["exitCode"]) for c in task["containers"]] == [
        ("regression", "STOPPED", 0)]
    # Every line was in CloudWatch Logs by the time the task showed STOPPED.
    assert lines[0].startswith(f"regression suite: 4 tests against {IMAGE_REPOSITORY}/auth-service:2.0.0 "
                               f"(tag 2.0.0) at {service_url}")
    assert lines[1] == f"GET {service_url}/version -> 200 image {IMAGE_REPOSITORY}/auth-service:2.0.0"
    assert [line for line in lines if line.startswith("PASSED")] == [
        "PASSED test_health_and_readiness", "PASSED test_sign_in_round_trip", "PASSED test_list_pagination_is_stable",
        "PASSED test_write_then_read_back"]
    assert lines[-1] == "4 passed"


def test_a_suite_against_a_regressions_image_by_digest_fails_with_exit_code_1(aws, service_url):
    digest = push_image(aws["ecr"], "auth-service", "2.0.0-regressions")
    image = f"{IMAGE_REPOSITORY}/auth-service@{digest}"  # as a release passes it: the tag is the registry's to say
    arn = run_suite(aws["ecs"], image, service_url)
    task, _, lines = wait_until_stopped(aws, arn)
    assert task["containers"][0]["exitCode"] == 1
    assert "(tag 2.0.0-regressions)" in lines[0]
    assert "FAILED test_sign_in_round_trip - AssertionError: expected 200, got 500 from POST /sessions" in lines
    assert "PASSED test_health_and_readiness" in lines
    assert lines[-1] == "2 failed, 2 passed"


def test_a_suite_that_cannot_reach_the_service_fails(aws):
    arn = run_suite(aws["ecs"], f"{IMAGE_REPOSITORY}/auth-service:2.0.0", "http://127.0.0.1:9")  # discard: closed
    task, _, lines = wait_until_stopped(aws, arn)
    assert task["containers"][0]["exitCode"] == 2
    assert lines[1].startswith("GET http://127.0.0.1:9/version -> unreachable")
    assert "FAILED: the service did not answer; no test could run" in lines


def test_stop_task_kills_a_running_suite_and_a_reattach_no_longer_finds_it(aws, service_url, monkeypatch):
    monkeypatch.setattr(ecs_tasks.SIMULATOR, "step_seconds", 30.0)  # it cannot end on its own before it is stopped
    arn = run_suite(aws["ecs"], f"{IMAGE_REPOSITORY}/auth-service:2.0.0", service_url, started_by="run-42")
    running = aws["ecs"].list_tasks(cluster="omnisphere", startedBy="run-42", desiredStatus="RUNNING")["taskArns"]
    assert running == [arn]  # what EcsRunTaskOperator's reattach looks for
    aws["ecs"].stop_task(cluster="omnisphere", task=arn, reason="regression_test gave up waiting")
    task = aws["ecs"].describe_tasks(cluster="omnisphere", tasks=[arn])["tasks"][0]
    assert task["lastStatus"] == "STOPPED" and task["stopCode"] == "UserInitiated"
    assert task["stoppedReason"] == "regression_test gave up waiting"
    assert task["containers"][0]["exitCode"] == 137
    monkeypatch.setattr(ecs_tasks.SIMULATOR, "step_seconds", STEP_SECONDS)
    time.sleep(STEP_SECONDS * 12)  # long enough for a whole suite: a killed one writes nothing more, keeps its code
    task = aws["ecs"].describe_tasks(cluster="omnisphere", tasks=[arn])["tasks"][0]
    assert task["containers"][0]["exitCode"] == 137
    assert lines_of(aws["logs"], arn)[-1] == "suite stopped before it finished: regression_test gave up waiting"
    assert aws["ecs"].list_tasks(cluster="omnisphere", startedBy="run-42", desiredStatus="RUNNING")["taskArns"] == []


def test_every_catalog_suite_is_registered_and_runs_in_the_production_cluster(aws, service_url):
    catalog = load_catalog()
    for service in catalog.services:
        assert service.regression is not None
        definition = aws["ecs"].describe_task_definition(taskDefinition=service.regression.task_definition)
        [container] = definition["taskDefinition"]["containerDefinitions"]
        assert container["name"] == service.regression.container
        assert container["logConfiguration"]["options"]["awslogs-group"] == f"/ecs/{service.name}"
    arn = run_suite(aws["ecs"], f"{IMAGE_REPOSITORY}/auth-service:2.0.0", service_url,
                    cluster="omnisphere-production")
    task, _, _ = wait_until_stopped(aws, arn, cluster="omnisphere-production")
    assert task["clusterArn"].endswith("/omnisphere-production")
    assert task["containers"][0]["exitCode"] == 0


def test_a_log_group_that_exists_already_takes_the_suite_stream(aws, service_url):
    """The sample services create their service's log group: the suite writes its own stream in it."""
    groups = aws["logs"].describe_log_groups(logGroupNamePrefix="/ecs/billing-service")["logGroups"]
    if not groups:
        aws["logs"].create_log_group(logGroupName="/ecs/billing-service")
    response = aws["ecs"].run_task(cluster="omnisphere", taskDefinition="billing-service-regression",
                                   launchType="FARGATE", overrides={"containerOverrides": []})
    arn = response["tasks"][0]["taskArn"]
    task, _, _ = wait_until_stopped(aws, arn)
    assert task["containers"][0]["exitCode"] == 0
    stream = f"regression/regression/{arn.rsplit('/', 1)[-1]}"
    events = aws["logs"].get_log_events(logGroupName="/ecs/billing-service", logStreamName=stream)["events"]
    # Without an image under test, the suite names the image of its own container; without a URL it probes nothing.
    assert events[0]["message"].startswith(f"regression suite: 4 tests against {IMAGE_REPOSITORY}/billing-service-"
                                           "regression:1.0.0")
    assert events[-1]["message"] == "4 passed"


# ---- regression_test's wait and its time limit, against the same moto ------------------------------------------------
@pytest.fixture()
def aws_default(aws, monkeypatch) -> None:
    """Point Airflow's aws_default connection (what the catalog's services use) at this module's moto."""
    endpoint = aws["ecs"].meta.endpoint_url
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({
        "conn_type": "aws", "login": "local-only", "password": "local-only-secret",
        "extra": {"region_name": REGION, "endpoint_url": endpoint}}))


def first_event(trigger: Any, timeout: float = 10) -> Any:
    async def collect() -> Any:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(collect(), timeout=timeout))


def trigger_for(arn: str, attempts: int = 100) -> Any:
    from omnisphere_release.operators.regression import EcsTaskStoppedTrigger

    return EcsTaskStoppedTrigger(cluster="omnisphere", task_arn=arn, waiter_delay=0, waiter_max_attempts=attempts,
                                 aws_conn_id="aws_default", region_name=REGION, log_group="/ecs/auth-service",
                                 log_stream=f"regression/regression/{arn.rsplit('/', 1)[-1]}")


def test_the_wait_forwards_every_line_of_the_suite_and_ends_when_it_stops(aws, aws_default, service_url, capfd):
    arn = run_suite(aws["ecs"], f"{IMAGE_REPOSITORY}/auth-service:2.0.0-regressions", service_url)
    capfd.readouterr()
    event = first_event(trigger_for(arn))
    assert event == {"status": "success", "task_arn": arn, "cluster": "omnisphere", "log_group": "/ecs/auth-service",
                     "log_stream": f"regression/regression/{arn.rsplit('/', 1)[-1]}", "log_region": REGION}
    # Each forwarded line is logged as "[<its CloudWatch timestamp>] <line>" by the trigger.
    forwarded = re.findall(r"\[\d{4}-\d\d-\d\d [\d:,]+\] (.*?) \[omnisphere_release", capfd.readouterr().out)
    assert forwarded == lines_of(aws["logs"], arn)  # each line once, in order
    assert forwarded[-1] == "2 failed, 2 passed"


def test_a_suite_that_outlives_its_polls_is_a_timeout_event(aws, aws_default, service_url, monkeypatch):
    monkeypatch.setattr(ecs_tasks.SIMULATOR, "step_seconds", 30.0)
    arn = run_suite(aws["ecs"], f"{IMAGE_REPOSITORY}/auth-service:2.0.0", service_url)
    event = first_event(trigger_for(arn, attempts=3))
    assert event["status"] == "timeout" and event["message"] == "still PENDING after 3 polls 0s apart"


def test_a_task_ecs_does_not_know_is_an_error_event(aws, aws_default):
    event = first_event(trigger_for("arn:aws:ecs:eu-west-1:123456789012:task/omnisphere/0000-gone"))
    assert event["status"] == "error" and "ECS does not know task" in event["message"]


def test_at_its_time_limit_the_stage_stops_the_suite_and_fails_for_good(aws, aws_default, service_url, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from omnisphere_release.operators.regression import EcsRegressionTestOperator

    monkeypatch.setattr(ecs_tasks.SIMULATOR, "step_seconds", 30.0)
    arn = run_suite(aws["ecs"], f"{IMAGE_REPOSITORY}/auth-service:2.0.0", service_url)
    operator = EcsRegressionTestOperator(task_id="regression_test", service="auth-service")
    with pytest.raises(AirflowFailException, match=r"did not finish within its 15 min \(catalog "
                                                   r"regression.timeout_minutes\): still RUNNING after 180 polls"):
        operator.execute_complete({}, {"status": "timeout", "task_arn": arn, "cluster": "omnisphere",
                                       "message": "still RUNNING after 180 polls 5s apart"})
    task = aws["ecs"].describe_tasks(cluster="omnisphere", tasks=[arn])["tasks"][0]
    assert (task["lastStatus"], task["stopCode"], task["containers"][0]["exitCode"]) == ("STOPPED", "UserInitiated", 137)
    assert task["stoppedReason"].startswith("regression_test gave up waiting: still RUNNING after 180 polls")


def test_a_retry_reattaches_to_its_runs_suite_running_or_finished_but_not_to_one_stopped_before_its_end(
        aws, aws_default, service_url, monkeypatch):
    from omnisphere_release.operators.regression import EcsRegressionTestOperator

    def reattached_to(started_by: str) -> str | None:
        operator = EcsRegressionTestOperator(task_id="regression_test", service="auth-service")
        operator._resolve()
        operator._try_reattach_task(started_by)
        return operator.arn

    image = f"{IMAGE_REPOSITORY}/auth-service:2.0.0-regressions"
    finished = run_suite(aws["ecs"], image, service_url, started_by="run-finished")
    wait_until_stopped(aws, finished)
    assert reattached_to("run-finished") == finished  # its verdict (exit code 1) stands: no second run
    monkeypatch.setattr(ecs_tasks.SIMULATOR, "step_seconds", 30.0)
    running = run_suite(aws["ecs"], image, service_url, started_by="run-running")
    assert reattached_to("run-running") == running
    killed = run_suite(aws["ecs"], image, service_url, started_by="run-killed")
    aws["ecs"].stop_task(cluster="omnisphere", task=killed, reason="worker lost")
    assert reattached_to("run-killed") is None  # no verdict: the retry starts a new suite
    assert reattached_to("run-never") is None
