"""Sample HTTP services: one per catalog service, standing in for the service behind its load balancer.

Each answers /health, /ready and /version as the image that the simulated ECS service serves at that moment (during a
canary, some requests reach the new image and some the old), and publishes the load balancer's metrics
(RequestCount, HTTPCode_Target_5XX_Count, TargetResponseTime) to the local CloudWatch every few seconds.
Faults come from the image tag: ``-unhealthy`` fails /health and /ready, ``-errors`` answers 5xx to a share of
its application traffic (not its health endpoints) well above any catalog threshold, ``-logerrors`` answers 200
everywhere but logs ERROR lines (and a traceback) every few seconds, and ``-stale`` leaves one task of the previous
image registered behind the load balancer: it keeps answering a share of the requests, /version included.

Each also writes its application log to CloudWatch Logs as ECS's awslogs driver would: in the catalog's
``monitoring.logs.log_group``, one stream per task, named ``<stream prefix>/<container>/<task id>`` where the stream
prefix names the image the task runs (see omnisphere_release.hooks.cloudwatch.log_stream_prefix, the rule the
monitoring gate finds the new task set's streams by). A sample service stands for ``TASKS_PER_IMAGE`` tasks per image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from devstack.ecs_simulator import LISTENER, alternate_target_group, image_tag

log = logging.getLogger("devstack.sample_services")

ERROR_SHARE = 0.25  # of requests answered 5xx by an ``-errors`` image
STALE_SHARE = 0.5  # of requests that the previous image's leftover task answers behind a ``-stale`` image
ERROR_LINES_PER_INTERVAL = 2  # ERROR lines a ``-logerrors`` image logs per task and publishing interval
TASKS_PER_IMAGE = 2  # the tasks (log streams) one sample service stands for, per image it serves
HEALTH_PATHS = ("/health", "/ready", "/version")
BACKGROUND_REQUESTS = 120  # synthetic requests per publishing interval, so that metrics exist without real traffic


class ServiceTraffic:
    """Counts the requests one sample service answered since the last publication, per task set: the old one (or
    the only one) and the new one of a canary or linear deployment in flight (ServedImage.new_task_set)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[bool, tuple[int, int, list[float]]] = {}

    def record(self, status: int, seconds: float, new_task_set: bool = False) -> None:
        with self.lock:
            requests, errors, latencies = self.counts.get(new_task_set, (0, 0, []))
            self.counts[new_task_set] = (requests + 1, errors + (status >= 500), [*latencies, seconds])

    def drain(self) -> dict[bool, tuple[int, int, list[float]]]:
        """Return (requests, 5xx, latencies) per task set (True: the new one) and start counting again."""
        with self.lock:
            result, self.counts = self.counts, {}
        return result


def respond(path: str, image: str | None) -> tuple[int, dict[str, Any], float]:
    """Return (status, body, simulated latency in seconds) for one request served by ``image``."""
    tag = image_tag(image or "none:unknown")
    latency = random.uniform(0.01, 0.06)
    # An "-errors" image keeps its health endpoints green (as a broken release often does) and fails a share of its
    # real traffic: only the metrics reveal it, which is what the monitoring gate is for.
    if tag.endswith("-errors") and path not in HEALTH_PATHS and random.random() < ERROR_SHARE:
        return 500, {"error": "internal error"}, latency
    unhealthy = tag.endswith("-unhealthy")
    if path == "/health":
        return (503, {"status": "failing", "image": image}, latency) if unhealthy else (200, {"status": "ok"}, latency)
    if path == "/ready":
        return (503, {"ready": False}, latency) if unhealthy else (200, {"ready": True}, latency)
    if path == "/version":
        return 200, {"image": image, "version": tag}, latency
    return 404, {"error": f"no route {path}"}, latency


class ServingHistory:
    """Wrap the simulator's choice of image per request, remembering the image served before the current one, so
    that a ``-stale`` release can leave a task of it answering (ECS deregisters old tasks; a stuck one does not)."""

    def __init__(self, serving_image: Callable[[], str | None]) -> None:
        self.serving_image = serving_image
        self.lock = threading.Lock()
        self.current: str | None = None
        self.previous: str | None = None

    def __call__(self) -> str | None:
        """Return the image that answers one request."""
        image = self.serving_image()
        with self.lock:
            if image != self.current:
                self.previous, self.current = self.current, image
            previous = self.previous
        if image and previous and image_tag(image).endswith("-stale") and random.random() < STALE_SHARE:
            return previous
        return image


def make_handler(serving_image: Callable[[], str | None], traffic: ServiceTraffic | None,
                 listener: str = "production", listeners: dict[str, int] | None = None) -> type[BaseHTTPRequestHandler]:
    """Return a request handler answering as ``serving_image`` picks, on ``listener`` ("production", counted in
    ``traffic``, or "test": the blue/green test listener, whose requests no production metric counts).

    ``GET /_devstack/listeners`` answers the ports of ``listeners`` (devstack only: how a test finds the test
    listener of a stack whose environment does not name it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/_devstack/listeners" and listeners is not None:
                status, body, latency = 200, dict(listeners), 0.0
                image = None
            else:
                LISTENER.set(listener)  # this request's thread: serving_image answers as this listener forwards
                image = serving_image()
                status, body, latency = respond(path, image)
            time.sleep(latency)
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            if traffic is not None and image is not None:
                traffic.record(status, latency, bool(getattr(image, "new_task_set", False)))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep the devstack quiet
            return

    return Handler


class SampleService:
    """One catalog service behind its load balancer: the production listener on ``port`` and the blue/green test
    listener on ``test_port`` (an ALB's second listener; only the new task set answers there during a blue/green
    deployment, see EcsDeploymentSimulator.test_image)."""

    def __init__(self, name: str, serving_image: Callable[[], str | None], host: str = "127.0.0.1",
                 port: int = 0, test_port: int = 0) -> None:
        self.name = name
        self.serving_image: Callable[[], str | None] = ServingHistory(serving_image)
        self.traffic = ServiceTraffic()
        self.listeners: dict[str, int] = {}
        self.test_server = ThreadingHTTPServer((host, test_port), make_handler(serving_image, None, "test"))
        self.test_server.daemon_threads = True
        self.test_port = self.listeners["test_listener_port"] = self.test_server.server_address[1]
        self.server = ThreadingHTTPServer((host, port), make_handler(self.serving_image, self.traffic,
                                                                     listeners=self.listeners))
        self.server.daemon_threads = True
        self.port = self.listeners["production_port"] = self.server.server_address[1]
        self.threads = [threading.Thread(target=server.serve_forever, name=f"sample-{name}-{which}", daemon=True)
                        for which, server in (("production", self.server), ("test", self.test_server))]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        for server in (self.server, self.test_server):
            server.shutdown()
            server.server_close()


class MetricsPublisher:
    """Publish each sample service's load balancer metrics to CloudWatch, and its application log lines to CloudWatch
    Logs, every ``interval`` seconds.

    ``logs`` is a CloudWatch Logs client; None makes one beside ``cloudwatch`` (same endpoint, region and
    credentials). ``log_destinations`` maps a target group to (log group, container name); None takes them from the
    catalog (``monitoring.logs.log_group`` and ``ecs.container`` of the service with that target group).
    """

    def __init__(self, cloudwatch: Any, services: list[tuple[SampleService, str]], interval: float = 2.0,
                 logs: Any | None = None, log_destinations: dict[str, tuple[str, str]] | None = None) -> None:
        self.cloudwatch = cloudwatch
        self.services = services  # (sample service, target group dimension value)
        self.interval = interval
        self.logs = logs if logs is not None else client_beside(cloudwatch, "logs")
        self.log_destinations = log_destinations if log_destinations is not None else destinations_from_catalog()
        self.log_writer = LogWriter(self.logs)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="metrics-publisher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for service, target_group in self.services:
                try:
                    self.publish(service, target_group)
                except Exception:  # keep publishing for the other services; the devstack log says why
                    log.exception("Could not publish metrics of %s", service.name)

    def publish(self, service: SampleService, target_group: str) -> None:
        """Publish one interval: the load balancer's metrics of the production target group, and of the alternate
        one while a canary or linear deployment's new task set takes part of the traffic; the tasks' log lines."""
        counts = service.traffic.drain()
        served: dict[str, list[int]] = {}  # image -> [requests, 5xx] of the synthetic traffic
        for _ in range(BACKGROUND_REQUESTS):  # synthetic traffic: what the service's real clients would send
            image = service.serving_image()
            status, _body, latency = respond("/api", image)
            new_task_set = bool(getattr(image, "new_task_set", False))
            requests, errors, latencies = counts.get(new_task_set, (0, 0, []))
            counts[new_task_set] = (requests + 1, errors + (status >= 500), [*latencies, latency])
            if image:
                tally = served.setdefault(image, [0, 0])
                tally[0] += 1
                tally[1] += status >= 500
        destination = self.log_destinations.get(target_group)
        if destination is not None:
            try:
                self.log_writer.write(service.name, *destination, served)
            except Exception:  # the metrics still go out; the devstack log says why the log lines did not
                log.exception("Could not write the log lines of %s to %s", service.name, destination[0])
        counts.setdefault(False, (0, 0, []))  # the production target group reports every interval, 0 included
        for new_task_set, (requests, errors, latencies) in counts.items():
            dimensions = [{"Name": "TargetGroup",
                           "Value": alternate_target_group(target_group) if new_task_set else target_group}]
            metric_data: list[dict[str, Any]] = [
                {"MetricName": "RequestCount", "Dimensions": dimensions, "Value": requests, "Unit": "Count"},
                {"MetricName": "HTTPCode_Target_5XX_Count", "Dimensions": dimensions, "Value": errors,
                 "Unit": "Count"}]
            if latencies:
                metric_data.append({"MetricName": "TargetResponseTime", "Dimensions": dimensions, "Unit": "Seconds",
                                    "Values": [round(v, 4) for v in latencies[:150]]})
            self.cloudwatch.put_metric_data(Namespace="AWS/ApplicationELB", MetricData=metric_data)


def client_beside(client: Any, service_name: str) -> Any:
    """Return a boto3 client of ``service_name`` on the endpoint, region, config and credentials of ``client``."""
    import boto3

    # The devstack's random credentials are only in the client it was given; botocore exposes them no other way.
    credentials = client._request_signer._credentials.get_frozen_credentials()
    return boto3.client(service_name, endpoint_url=client.meta.endpoint_url, region_name=client.meta.region_name,
                        aws_access_key_id=credentials.access_key, aws_secret_access_key=credentials.secret_key,
                        config=client.meta.config)


def destinations_from_catalog() -> dict[str, tuple[str, str]]:
    """Map each catalog service's target group to its log group and container (services without a log check:
    none)."""
    from omnisphere_release.catalog import load_catalog

    return {s.monitoring.target_group: (s.monitoring.logs.log_group, s.ecs.container)
            for s in load_catalog().services if s.monitoring.logs is not None}


def task_id(sample: str, image: str, index: int) -> str:
    """Return the id of a sample service's ``index``-th task of ``image``: 32 hex digits, as an ECS task id."""
    return hashlib.sha256(f"{sample}|{image}|{index}".encode()).hexdigest()[:32]


def log_lines(image: str, requests: int, errors: int, task: int) -> list[str]:
    """Return what one task of ``image`` logs for one publishing interval, in which it served ``requests``."""
    tag = image_tag(image)
    lines = [f"INFO served {requests} requests ({errors} 5xx) as {tag}"]
    if tag.endswith("-logerrors"):
        for n in range(ERROR_LINES_PER_INTERVAL):
            lines.append(f"ERROR payments client: call {task}-{n} to the ledger failed, answering from cache: "
                         f"TimeoutError: read timed out after 5.0s")
        lines.append('Traceback (most recent call last):\n  File "/app/ledger.py", line 88, in post\n'
                     "TimeoutError: read timed out after 5.0s")
    return lines


class LogWriter:
    """Write sample services' log lines to CloudWatch Logs, creating log groups and streams as they are first used."""

    def __init__(self, logs: Any) -> None:
        self.logs = logs
        self.created: set[str] = set()  # log groups, and "group|stream"

    def write(self, sample: str, log_group: str, container: str, served: dict[str, list[int]]) -> None:
        """Log what each task of each image in ``served`` (image -> [requests, 5xx]) did in the last interval."""
        from omnisphere_release.hooks.cloudwatch import log_stream_prefix

        self._ensure(log_group, None)
        now = int(time.time() * 1000)
        for image, (requests, errors) in served.items():
            for index in range(TASKS_PER_IMAGE):
                stream = log_stream_prefix(image, container) + task_id(sample, image, index)
                self._ensure(log_group, stream)
                share = requests // TASKS_PER_IMAGE + (index < requests % TASKS_PER_IMAGE)
                events = [{"timestamp": now, "message": line}
                          for line in log_lines(image, share, errors // TASKS_PER_IMAGE, index)]
                self.logs.put_log_events(logGroupName=log_group, logStreamName=stream, logEvents=events)

    def _ensure(self, log_group: str, stream: str | None) -> None:
        key = log_group if stream is None else f"{log_group}|{stream}"
        if key in self.created:
            return
        try:
            if stream is None:
                self.logs.create_log_group(logGroupName=log_group)
            else:
                self.logs.create_log_stream(logGroupName=log_group, logStreamName=stream)
        except self.logs.exceptions.ResourceAlreadyExistsException:
            pass  # another environment's sample service of the same catalog service created it
        self.created.add(key)
