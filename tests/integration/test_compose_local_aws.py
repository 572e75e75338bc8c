"""The docker-compose `local` profile's AWS side, run here with the entrypoint the compose file gives it (only the
address and ports changed to loopback and free ones): what the local connections point at must answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml

from devstack.net import free_port, port_is_open
from omnisphere_release.catalog import load_catalog

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def consecutive_free_ports(count: int) -> int:
    for _ in range(50):
        first = free_port()
        if not any(port_is_open(first + offset) for offset in range(count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports")


def test_local_aws_serves_the_ecs_simulator_and_the_sample_services_the_connections_name():
    catalog = load_catalog(REPO / "include" / "services.yaml")
    entrypoint = yaml.safe_load((REPO / "docker-compose.yaml").read_text())["services"]["local-aws"]["entrypoint"]
    assert entrypoint[:3] == ["python", "-m", "devstack"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")]),
           "OMNISPHERE_CATALOG": str(REPO / "include" / "services.yaml")}
    # The ports are free when chosen but not reserved: another test's server may take one before local-aws binds it.
    # That race is this test's, not the entrypoint's, so it chooses again; any other failure fails the test.
    for _attempt in range(3):
        aws_port, first_sample = free_port(), consecutive_free_ports(len(catalog.services))
        args = list(entrypoint)
        args[args.index("--host") + 1] = "127.0.0.1"
        args[args.index("--port") + 1] = str(aws_port)
        args[args.index("--first-sample-port") + 1] = str(first_sample)
        process = subprocess.Popen([sys.executable, *args[1:]], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        ready = process.stdout.readline()
        if ready.startswith("local AWS ready"):
            break
        output = ready + process.communicate(timeout=60)[0]
        assert "Address already in use" in output, f"local-aws did not start:\n{output[-3000:]}"
    else:
        raise AssertionError("local-aws found a port taken three times in a row")
    try:
        ecs = boto3.client("ecs", endpoint_url=f"http://127.0.0.1:{aws_port}", region_name="eu-west-1",
                           aws_access_key_id="local-only", aws_secret_access_key="local-only")  # noqa: S106 - moto's
        for index, service in enumerate(catalog.services):
            described = ecs.describe_services(cluster=service.ecs.cluster, services=[service.ecs.service])
            assert described["services"][0]["status"] == "ACTIVE"
            # the connection of include/local/connections.yaml for this service names this port
            with urllib.request.urlopen(f"http://127.0.0.1:{first_sample + index}/version", timeout=5) as response:
                assert json.loads(response.read())["image"].endswith(f"/{service.name}:1.0.0")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    deadline = time.monotonic() + 10
    while port_is_open(aws_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not port_is_open(aws_port)
