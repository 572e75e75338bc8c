"""Sample HTTP services: one per catalog service, standing in for the service behind its load balancer.

Each answers /health, /ready and /version as the image that the simulated ECS service serves at that moment (during a
canary, some requests reach the new image and some the old), and publishes the load balancer's metrics
(RequestCount, HTTPCode_Target_5XX_Count, TargetResponseTime) to the local CloudWatch every few seconds.
Faults come from the image tag: ``-unhealthy`` fails /health and /ready, ``-errors`` answers 5xx to a share of
its application traffic (not its health endpoints) well above any catalog threshold.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from devstack.ecs_simulator import image_tag

log = logging.getLogger("devstack.sample_services")

ERROR_SHARE = 0.25  # of requests answered 5xx by an ``-errors`` image
HEALTH_PATHS = ("/health", "/ready", "/version")
BACKGROUND_REQUESTS = 120  # synthetic requests per publishing interval, so that metrics exist without real traffic


class ServiceTraffic:
    """Counts the requests one sample service answered since the last publication."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.latencies: list[float] = []

    def record(self, status: int, seconds: float) -> None:
        with self.lock:
            self.requests += 1
            self.errors += status >= 500
            self.latencies.append(seconds)

    def drain(self) -> tuple[int, int, list[float]]:
        with self.lock:
            result = (self.requests, self.errors, self.latencies)
            self.requests, self.errors, self.latencies = 0, 0, []
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


def make_handler(serving_image: Callable[[], str | None], traffic: ServiceTraffic) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's naming
            status, body, latency = respond(self.path.split("?", 1)[0], serving_image())
            time.sleep(latency)
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            traffic.record(status, latency)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep the devstack quiet
            return

    return Handler


class SampleService:
    def __init__(self, name: str, serving_image: Callable[[], str | None], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.name = name
        self.serving_image = serving_image
        self.traffic = ServiceTraffic()
        self.server = ThreadingHTTPServer((host, port), make_handler(serving_image, self.traffic))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"sample-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MetricsPublisher:
    """Publish each sample service's load balancer metrics to CloudWatch every ``interval`` seconds."""

    def __init__(self, cloudwatch: Any, services: list[tuple[SampleService, str]], interval: float = 2.0) -> None:
        self.cloudwatch = cloudwatch
        self.services = services  # (sample service, target group dimension value)
        self.interval = interval
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
        requests, errors, latencies = service.traffic.drain()
        for _ in range(BACKGROUND_REQUESTS):  # synthetic traffic: what the service's real clients would send
            status, _body, latency = respond("/api", service.serving_image())
            requests += 1
            errors += status >= 500
            latencies.append(latency)
        dimensions = [{"Name": "TargetGroup", "Value": target_group}]
        self.cloudwatch.put_metric_data(
            Namespace="AWS/ApplicationELB",
            MetricData=[
                {"MetricName": "RequestCount", "Dimensions": dimensions, "Value": requests, "Unit": "Count"},
                {"MetricName": "HTTPCode_Target_5XX_Count", "Dimensions": dimensions, "Value": errors,
                 "Unit": "Count"},
                {"MetricName": "TargetResponseTime", "Dimensions": dimensions, "Unit": "Seconds",
                 "Values": [round(v, 4) for v in latencies[:150]]},
            ],
        )
