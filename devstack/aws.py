"""The devstack's AWS side: moto with the ECS deployment simulator, the S3 faults and ECR's image retention, the
catalog's cluster, services, task definitions and backup buckets, the ECR registry with the images CI has built
(``push_image`` adds one), one sample service per catalog entry and the CloudWatch metrics they publish.

The devstack starts it on 127.0.0.1 with free ports; the docker-compose `local` profile runs it on its own
(``python -m devstack aws --host 0.0.0.0 --port 5000 --first-sample-port 5001``), inside its container network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from devstack.net import free_port

REGION = "eu-west-1"
ACCOUNT = "123456789012"
BACKUP_BUCKET = "omnisphere-backups-local"
REGISTRY = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
REPOSITORY_PREFIX = "omnisphere"
IMAGE_REPOSITORY = f"{REGISTRY}/{REPOSITORY_PREFIX}"
INITIAL_TAG = "1.0.0"
# Images "CI has already built" in the local registry: what the README and `make demo` release. Any other tag must be
# pushed first (`python -m devstack push-image SERVICE TAG`), as in production, or preflight refuses it.
BUILT_TAGS = (INITIAL_TAG, "1.1.0", "1.2.0", "1.2.0-errors", "1.2.0-crashloop", "1.2.0-unhealthy")

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

    from devstack import ecr, s3_faults
    from devstack.ecs_simulator import EcsDeploymentSimulator
    from devstack.sample_services import MetricsPublisher, SampleService

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
        ecr.install()
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


def push_image(ecr: Any, service: str, tag: str, build: str = "") -> str:
    """Put an image ``omnisphere/<service>:<tag>`` into the local registry, as CI's docker push would; return its
    digest. The manifest names the tag and the build, so each tag is an image of its own, and pushing a tag again
    with another ``build`` (a rebuild) moves the tag to a new image. Pushing the same build again changes nothing.

    The digest is the manifest's sha256, as a registry computes it: moto would give every image here the same one.
    """
    built = f"{service}:{tag}" + (f"+{build}" if build else "")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                           "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2,
                                      "digest": "sha256:" + hashlib.sha256(built.encode()).hexdigest()},
                           "layers": []})
    digest = "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
    repository = f"{REPOSITORY_PREFIX}/{service}"
    with contextlib.suppress(ecr.exceptions.ImageAlreadyExistsException):  # this build is under this tag already
        ecr.put_image(repositoryName=repository, imageManifest=manifest, imageTag=tag, imageDigest=digest)
    return digest


def seed_aws(session: Any, endpoint: str, catalog: Any) -> None:
    """Create the ECS cluster, services and current task definitions of the catalog, their ECR repositories with the
    images already built, and the backup bucket."""
    ecr = session.client("ecr", endpoint_url=endpoint)
    for service in catalog.services:
        ecr.create_repository(repositoryName=f"{REPOSITORY_PREFIX}/{service.name}")
        for tag in BUILT_TAGS:
            push_image(ecr, service.name, tag)
    ecs = session.client("ecs", endpoint_url=endpoint)
    for cluster in sorted({s.ecs.cluster for s in catalog.services}):
        ecs.create_cluster(clusterName=cluster)
    for service in catalog.services:
        task_definition = ecs.register_task_definition(
            family=service.ecs.service,
            networkMode="awsvpc",
            requiresCompatibilities=["FARGATE"],
            cpu="256",
            memory="512",
            containerDefinitions=[{
                "name": service.ecs.container,
                "image": f"{IMAGE_REPOSITORY}/{service.name}:{INITIAL_TAG}",
                "essential": True,
                "portMappings": [{"containerPort": 8080, "protocol": "tcp"}],
                "environment": [{"name": "OMNI_SERVICE", "value": service.name}],
            }],
        )["taskDefinition"]
        ecs.create_service(
            cluster=service.ecs.cluster,
            serviceName=service.ecs.service,
            taskDefinition=task_definition["taskDefinitionArn"],
            desiredCount=service.ecs.desired_count,
            launchType="FARGATE",
        )
    s3 = session.client("s3", endpoint_url=endpoint)
    # The second bucket answers HeadBucket but refuses writes (a devstack fault, see devstack/s3_faults.py).
    for bucket in (BACKUP_BUCKET, f"{BACKUP_BUCKET}-unwritable"):
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
