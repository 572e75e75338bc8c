"""The devstack's AWS side: moto with the ECS deployment simulator and the S3 faults, the catalog's cluster, services,
task definitions and backup buckets, one sample service per catalog entry and the CloudWatch metrics they publish.

The devstack starts it on 127.0.0.1 with free ports; the docker-compose `local` profile runs it on its own
(``python -m devstack aws --host 0.0.0.0 --port 5000 --first-sample-port 5001``), inside its container network.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("devstack.aws")


@dataclass
class LocalAws:
    endpoint: str  # as seen from this machine
    port: int
    credentials: tuple[str, str]
    sample_ports: dict[str, int]  # service name -> port of its sample service
    parts: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for part in reversed(self.parts):
            started = time.monotonic()
            try:
                part.stop()
            except Exception:
                log.exception("could not stop %s", type(part).__name__)
            log.info("stopped %s in %.1fs", type(part).__name__, time.monotonic() - started)


def start(catalog: Any, host: str = "127.0.0.1", port: int = 0, first_sample_port: int = 0) -> LocalAws:
    """Start every part; port 0 takes a free port, first_sample_port 0 a free port per sample service (otherwise the
    sample services take consecutive ports in catalog order)."""
    import boto3
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

    from devstack import s3_faults
    from devstack.ecs_simulator import EcsDeploymentSimulator
    from devstack.sample_services import MetricsPublisher, SampleService
    from devstack.stack import REGION, free_port, seed_aws

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    simulator = EcsDeploymentSimulator(
        step_seconds=float(os.environ.get("OMNI_ECS_SIM_STEP_SECONDS", "0.3")),
        minute_seconds=float(os.environ.get("OMNI_ECS_SIM_MINUTE_SECONDS", "1.0")),
    )
    # moto accepts any key; a random one per stack lets tests prove that no secret reaches a log.
    credentials = (f"AKIADEVSTACK{secrets.token_hex(4).upper()}", secrets.token_urlsafe(24))
    aws = LocalAws(endpoint="", port=0, credentials=credentials, sample_ports={})
    try:
        simulator.install()
        simulator.start()
        s3_faults.install()
        aws.parts.append(simulator)
        moto = ThreadedMotoServer(ip_address=host, port=port or free_port(), verbose=False)
        moto.start()
        aws.parts.append(moto)
        aws.port = moto._server.server_port  # type: ignore[union-attr]
        aws.endpoint = f"http://127.0.0.1:{aws.port}"
        session = boto3.session.Session(aws_access_key_id=credentials[0], aws_secret_access_key=credentials[1],
                                        region_name=REGION)
        seed_aws(session, aws.endpoint, catalog)

        samples = []
        for index, service in enumerate(catalog.services):
            sample = SampleService(
                service.name,
                (lambda c=service.ecs.cluster, s=service.ecs.service: simulator.serving_image(c, s)),
                host=host, port=first_sample_port + index if first_sample_port else 0,
            )
            sample.start()
            aws.parts.append(sample)
            aws.sample_ports[service.name] = sample.port
            samples.append((sample, service.monitoring.target_group))
        quick = Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1})
        publisher = MetricsPublisher(session.client("cloudwatch", endpoint_url=aws.endpoint, config=quick), samples,
                                     interval=float(os.environ.get("OMNI_METRICS_INTERVAL_SECONDS", "2")))
        publisher.start()
        aws.parts.append(publisher)
    except BaseException:
        aws.stop()
        raise
    return aws
