"""The release's waits against the devstack's AWS, through a proxy that throttles, answers 503, drops connections and
goes away for a while: the ECS trigger follows a real deployment (and the way back) to its end, the bake trigger
survives a CloudWatch outage shorter than missing_data and fails, saying so, on a longer one.

The proxy stands between the Airflow AWS connection ``aws_flaky`` and moto; the test's own boto3 client talks to moto
directly, so the test sees the truth while the code under test sees the faults.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest

from omnisphere_release.hooks.ecs import IN_FLIGHT, EcsDeploymentHook, deployment_configuration
from omnisphere_release.triggers.ecs import EcsServiceDeploymentTrigger
from omnisphere_release.triggers.monitoring import MonitoringBakeTrigger

pytestmark = pytest.mark.integration

SERVICE = "notification-service"
CLUSTER = "omnisphere"


class FaultyProxy:
    """Forward HTTP requests to ``upstream``; ``rate`` of them fail (throttled, 503, or the connection dropped), and
    during an outage every one does (the connection is closed at once, as by an endpoint that went away)."""

    def __init__(self, upstream: str, seed: int = 13) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rate = 0.0
        self.outage_until = 0.0
        self.faults: Counter[str] = Counter()
        self.forwarded = 0
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (ConnectionError, OSError):
                    self.close_connection = True

            def do_POST(self) -> None:
                self.relay("POST")

            def do_GET(self) -> None:
                self.relay("GET")

            def relay(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fault = proxy.next_fault(json_protocol="X-Amz-Target" in self.headers)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault:
                    status, payload = ((400, {"__type": "ThrottlingException", "message": "Rate exceeded"})
                                       if fault == "throttle" else
                                       (503, {"__type": "ServiceUnavailable", "message": "Service Unavailable"}))
                    self.answer(status, {"Content-Type": "application/x-amz-json-1.1"}, json.dumps(payload).encode())
                    return
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                try:
                    upstream.request(method, self.path, body=body, headers=dict(self.headers))
                    response = upstream.getresponse()
                    data = response.read()
                    headers = {k: v for k, v in response.getheaders()
                               if k.lower() not in {"content-length", "transfer-encoding", "connection"}}
                    self.answer(response.status, headers, data)
                finally:
                    upstream.close()

            def answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next_fault(self, json_protocol: bool) -> str | None:
        with self.lock:
            if time.monotonic() < self.outage_until:
                fault = "drop"
            elif self.rng.random() < self.rate:
                fault = self.rng.choice(["throttle", "503", "drop"] if json_protocol else ["503", "drop"])
            else:
                self.forwarded += 1
                return None
            self.faults[fault] += 1
            return fault

    def outage(self, seconds: float) -> None:
        self.outage_until = time.monotonic() + seconds


@pytest.fixture
def flaky_aws(devstack: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyProxy]:
    """The Airflow connection ``aws_flaky``: the devstack's AWS, through a FaultyProxy."""
    proxy = FaultyProxy(os.environ["AWS_ENDPOINT_URL"])
    connection = json.loads(os.environ["AIRFLOW_CONN_AWS_DEFAULT"])
    connection["extra"]["endpoint_url"] = proxy.url
    monkeypatch.setenv("AIRFLOW_CONN_AWS_FLAKY", json.dumps(connection))
    yield proxy
    proxy.server.shutdown()
    proxy.server.server_close()


def aws(client: str) -> Any:
    return boto3.client(client, endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="eu-west-1")


def run_trigger(trigger: Any, during: Any = None, timeout: float = 180) -> dict[str, Any]:
    """Run ``trigger`` to its first event, calling ``during(seconds_since_start)`` every half second meanwhile."""

    async def main() -> dict[str, Any]:
        started = time.monotonic()
        events = trigger.run().__aiter__()
        pending = asyncio.ensure_future(events.__anext__())
        while True:
            done, _ = await asyncio.wait({pending}, timeout=0.5)
            if done:
                return pending.result().payload
            if during:
                during(time.monotonic() - started)
            assert time.monotonic() - started < timeout, "the trigger did not fire in time"

    return asyncio.run(main())


def start_deployment(ecs: Any, image_tag: str) -> tuple[str, str, str]:
    """Register a revision of the service with another image tag and deploy it (rolling); return the service's
    revision before, the new revision and the deployment ARN."""
    live = ecs.describe_services(cluster=CLUSTER, services=[SERVICE])["services"][0]
    current = ecs.describe_task_definition(taskDefinition=live["taskDefinition"])["taskDefinition"]
    container = dict(current["containerDefinitions"][0])
    container["image"] = container["image"].split("@")[0].rsplit(":", 1)[0] + f":{image_tag}"
    revision = ecs.register_task_definition(
        family=current["family"], containerDefinitions=[container], networkMode=current.get("networkMode", "awsvpc"),
        requiresCompatibilities=current.get("requiresCompatibilities", ["FARGATE"]),
        cpu=current.get("cpu", "256"), memory=current.get("memory", "512"))["taskDefinition"]["taskDefinitionArn"]
    service = ecs.update_service(cluster=CLUSTER, service=SERVICE, taskDefinition=revision,
                                 deploymentConfiguration=deployment_configuration("rolling", 0))["service"]
    arn = service.get("currentServiceDeployment") or ecs.list_service_deployments(
        cluster=CLUSTER, service=SERVICE, maxResults=1)["serviceDeployments"][0]["serviceDeploymentArn"]
    return live["taskDefinition"], revision, arn


def test_every_ecs_call_rides_out_a_third_of_answers_failing(flaky_aws):
    flaky_aws.rate = 0.3
    hook = EcsDeploymentHook("aws_flaky")

    revisions = {hook.describe_service(CLUSTER, SERVICE)["taskDefinition"] for _ in range(40)}

    assert len(revisions) == 1  # 40 answers, each the truth, though about a third of the requests failed
    assert set(flaky_aws.faults) == {"throttle", "503", "drop"}, flaky_aws.faults
    assert sum(flaky_aws.faults.values()) >= 8 and flaky_aws.forwarded >= 40


def test_a_deployment_and_the_way_back_are_followed_through_faults_and_an_outage(flaky_aws):
    ecs = aws("ecs")
    before, revision, arn = start_deployment(ecs, "9.9.1")
    flaky_aws.rate = 0.3

    def outage_once(elapsed: float) -> None:
        if elapsed > 1 and not flaky_aws.faults["outage"]:
            flaky_aws.faults["outage"] += 1
            flaky_aws.outage(6)

    event = run_trigger(EcsServiceDeploymentTrigger(arn, time.time() + 150, aws_conn_id="aws_flaky",
                                                    poll_seconds=1, read_failure_seconds=60), outage_once)

    assert event["status"] == "success", event
    assert event["deployment_status"] == "SUCCESSFUL"
    assert ecs.describe_services(cluster=CLUSTER, services=[SERVICE])["services"][0]["taskDefinition"] == revision
    assert flaky_aws.faults["outage"] and flaky_aws.faults["drop"], flaky_aws.faults

    # The way back, as rollback_ecs takes it (a step, a deferred wait, the next step), through the same faults.
    hook = EcsDeploymentHook("aws_flaky")
    actions: list[str] = []
    for _ in range(4):
        step = hook.return_to(CLUSTER, SERVICE, before, redeployed=any(a.startswith("redeployed") for a in actions))
        actions += [step.action] if step.action else []
        if step.wait_for is None:
            break
        settled = run_trigger(EcsServiceDeploymentTrigger(step.wait_for, time.time() + 150, aws_conn_id="aws_flaky",
                                                          poll_seconds=1, settle=True, read_failure_seconds=60))
        assert settled["status"] == "settled", settled
    assert actions == [f"redeployed {before}"]
    live = ecs.describe_services(cluster=CLUSTER, services=[SERVICE])["services"][0]
    assert live["taskDefinition"] == before
    assert ecs.describe_service_deployments(serviceDeploymentArns=[live["currentServiceDeployment"]])[
        "serviceDeployments"][0]["status"] not in IN_FLIGHT


def bake(seconds: float, missing_data_seconds: float) -> MonitoringBakeTrigger:
    from omnisphere_release.catalog import load_catalog

    monitoring = load_catalog().get(SERVICE).monitoring
    now = time.time()
    return MonitoringBakeTrigger(
        target_group=monitoring.target_group, started_at=now, bake_until=now + seconds, max_error_rate=0.5,
        max_p99_ms=60_000, missing_data_seconds=missing_data_seconds, alarms=[], aws_conn_id="aws_flaky",
        poll_seconds=1, window_seconds=60, allow_missing_data=True)


def test_the_bake_survives_a_cloudwatch_outage_shorter_than_missing_data(flaky_aws):
    flaky_aws.rate = 0.2

    def outage_once(elapsed: float) -> None:
        if elapsed > 2 and not flaky_aws.faults["outage"]:
            flaky_aws.faults["outage"] += 1
            flaky_aws.outage(5)

    started = time.monotonic()
    event = run_trigger(bake(seconds=12, missing_data_seconds=20), outage_once)

    assert event["status"] == "success", event
    assert flaky_aws.faults["outage"] and flaky_aws.faults["drop"]
    assert time.monotonic() - started < 40


def test_a_cloudwatch_outage_longer_than_missing_data_fails_the_bake_saying_so(flaky_aws):
    def outage_after_two_seconds(elapsed: float) -> None:
        if elapsed > 2:
            flaky_aws.outage(60)

    started = time.monotonic()
    event = run_trigger(bake(seconds=60, missing_data_seconds=6), outage_after_two_seconds)

    assert event["status"] == "unreadable", event
    reason = event["reason"]
    assert reason.startswith("CloudWatch could not be read for ")
    assert int(reason.split("for ", 1)[1].split("s", 1)[0]) >= 6
    assert "(limit 6s, the catalog's monitoring.missing_data_minutes)" in reason
    assert time.monotonic() - started < 50  # long before the 60 s bake would have ended
