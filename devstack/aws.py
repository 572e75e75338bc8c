"""The devstack's AWS side: moto with the ECS deployment simulator, the S3 faults and ECR's image retention, the
catalog's clusters (one per environment), services, task definitions, backup buckets (one per environment) and evidence
bucket, the ECR registry with the images CI has built (``push_image`` adds one), one sample service per catalog entry
and environment, and the CloudWatch metrics they publish.

moto answers on two listeners: the endpoint that clients use, where ``python -m devstack faults aws`` injects its
faults (devstack/faults.py), and an internal one on 127.0.0.1 for the devstack's own calls (seeding, the metrics the
sample services publish), which faults never touch: in AWS, a load balancer's metrics reach CloudWatch even while a
client cannot.

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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack.net import free_port

REGION = "eu-west-1"
ACCOUNT = "123456789012"
BACKUP_BUCKET = "omnisphere-backups-local"  # the default environment's; another environment's adds "-<name>"
EVIDENCE_BUCKET = "omnisphere-evidence-local"  # every release's report, kept as evidence for promotions
REGISTRY = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
REPOSITORY_PREFIX = "omnisphere"
IMAGE_REPOSITORY = f"{REGISTRY}/{REPOSITORY_PREFIX}"
INITIAL_TAG = "1.0.0"
# Images "CI has already built" in the local registry: what the README and `make demo` release. Any other tag must be
# pushed first (`python -m devstack push-image SERVICE TAG`), as in production, or preflight refuses it.
BUILT_TAGS = (INITIAL_TAG, "1.1.0", "1.2.0", "1.2.0-errors", "1.2.0-crashloop", "1.2.0-unhealthy", "1.2.0-logerrors",
              "1.2.0-stale")

log = logging.getLogger("devstack.aws")


def backup_bucket(catalog: Any, environment: Any) -> str:
    """Return the local backup bucket of ``environment``: the default environment keeps the devstack's historical
    bucket (every existing test and script uses it), every other one has its own."""
    return BACKUP_BUCKET if environment.name == catalog.default_environment else f"{BACKUP_BUCKET}-{environment.name}"


def sample_key(service: Any, environment: Any) -> str:
    """Name the sample service of ``service`` in ``environment``: ``auth-service`` in the default environment (its
    connection suffix is empty), ``auth-service_production`` in production, as the connection ids are suffixed."""
    return f"{service.name}{environment.connection_suffix}"


def deployments(catalog: Any) -> list[tuple[Any, Any]]:
    """Return (environment, service as it runs there) for every environment and service, default environment
    first, so that its sample services keep the first ports (docker-compose's local profile relies on it)."""
    environments = sorted(catalog.environments, key=lambda e: e.name != catalog.default_environment)
    return [(environment, catalog.get(service.name, environment.name))
            for environment in environments for service in catalog.services]


@dataclass
class LocalAws:
    endpoint: str  # as seen from this machine
    port: int
    credentials: tuple[str, str]
    sample_ports: dict[str, int]  # service name -> port of its sample service
    # service name -> port of its sample service's test listener (blue/green: green alone before the switch)
    test_listener_ports: dict[str, int] = field(default_factory=dict)
    internal_port: int = 0  # the devstack's own calls go there: never faulted
    parts: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for part in reversed(self.parts):
            started = time.monotonic()
            try:
                part.stop()
            except Exception:
                log.exception("could not stop %s", type(part).__name__)
            log.info("stopped %s in %.1fs", type(part).__name__, time.monotonic() - started)


class MotoEndpoint:
    """moto's WSGI application on two listeners: ``port`` for clients, with the faults of ``faults_file`` (none when
    it is None), and ``internal_port`` on 127.0.0.1 for the devstack itself.

    An outage closes the client listener, so that connections are refused, and opens it again on the same port when
    the outage ends; a watcher thread looks every 0.1 s, since no request arrives to notice it then.
    """

    def __init__(self, host: str, port: int, faults_file: Path | None = None) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        from devstack.faults import FaultInjector, FaultState

        self.host = host
        self.port = port or free_port()
        self.internal_port = 0
        self.app = DomainDispatcherApplication(create_backend_app)
        self.faults = FaultState(faults_file) if faults_file else None
        self.client_app = FaultInjector(self.app, self.faults) if self.faults else self.app
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._client_server: Any = None
        self._internal_server: Any = None
        self._watcher = threading.Thread(target=self._watch, name="aws-faults-watcher", daemon=True)

    def start(self) -> None:
        self._internal_server = self._serve(self.app, "127.0.0.1", 0)
        self.internal_port = self._internal_server.server_port
        self._client_server = self._serve(self.client_app, self.host, self.port)
        if self.faults:
            self._watcher.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        with self._lock:
            for server in (self._client_server, self._internal_server):
                if server is not None:
                    server.shutdown()
                    server.server_close()
            self._client_server = self._internal_server = None

    @staticmethod
    def _serve(app: Any, host: str, port: int) -> Any:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"moto-{server.server_port}",
                         daemon=True).start()
        return server

    def _watch(self) -> None:
        assert self.faults is not None
        failing_since = None  # when reopening the port began to fail: said once, not ten times a second
        while not self._stopping.wait(0.1):
            try:
                in_outage = self.faults.current().in_outage()
                with self._lock:
                    if self._stopping.is_set():
                        return
                    if in_outage and self._client_server is not None:
                        self._client_server.shutdown()
                        self._client_server.server_close()
                        self._client_server = None
                        log.warning("AWS endpoint on port %d closed: outage (connections are refused)", self.port)
                    elif not in_outage and self._client_server is None:
                        self._client_server = self._serve(self.client_app, self.host, self.port)
                        log.warning("AWS endpoint on port %d open again: outage over%s", self.port,
                                    f" ({time.monotonic() - failing_since:.1f}s late: the port was taken)"
                                    if failing_since else "")
                        failing_since = None
            except OSError:  # the port cannot be bound again yet (another socket took it): retry every round
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.exception("cannot open the AWS endpoint on port %d again after an outage; retrying every "
                                  "0.1s", self.port)


def start(catalog: Any, host: str = "127.0.0.1", port: int = 0, first_sample_port: int = 0,
          faults_file: Path | None = None) -> LocalAws:
    """Start every part; port 0 takes a free port, first_sample_port 0 a free port per sample service (otherwise the
    sample services take consecutive ports in catalog order). ``faults_file`` is where ``python -m devstack faults
    aws`` writes the endpoint's faults (none without it)."""
    import boto3
    from botocore.config import Config

    from devstack import ecr, ecs_tasks, s3_faults
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
        ecs_tasks.install(catalog, step_seconds=simulator.step_seconds)  # RunTask: each service's regression suite
        aws.parts.append(simulator)
        moto = MotoEndpoint(host, port, faults_file)
        moto.start()
        aws.parts.append(moto)
        aws.port, aws.internal_port = moto.port, moto.internal_port
        aws.endpoint = f"http://127.0.0.1:{aws.port}"
        internal_endpoint = f"http://127.0.0.1:{aws.internal_port}"
        session = boto3.session.Session(aws_access_key_id=credentials[0], aws_secret_access_key=credentials[1],
                                        region_name=REGION)
        seed_aws(session, internal_endpoint, catalog)

        samples = []
        for index, (environment, service) in enumerate(deployments(catalog)):
            sample = SampleService(
                sample_key(service, environment),
                (lambda c=service.ecs.cluster, s=service.ecs.service: simulator.serving_image(c, s)),
                host=host, port=first_sample_port + index if first_sample_port else 0,
            )
            sample.start()
            aws.parts.append(sample)
            aws.sample_ports[sample_key(service, environment)] = sample.port
            aws.test_listener_ports[sample_key(service, environment)] = sample.test_port
            # The catalog names one target group per service: both environments' traffic counts in its metrics.
            samples.append((sample, service.monitoring.target_group))
        quick = Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1})
        # The sample services' application logs go where each service's tasks log (awslogs): its catalog log group.
        log_destinations = {s.monitoring.target_group: (s.monitoring.logs.log_group, s.ecs.container)
                            for s in catalog.services if s.monitoring.logs is not None}
        publisher = MetricsPublisher(session.client("cloudwatch", endpoint_url=internal_endpoint, config=quick), samples,
                                     interval=float(os.environ.get("OMNI_METRICS_INTERVAL_SECONDS", "2")),
                                     logs=session.client("logs", endpoint_url=internal_endpoint, config=quick),
                                     log_destinations=log_destinations)
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
    """Create the ECS clusters of every environment with each service in each, the current task definitions, the ECR
    repositories with the images already built, each environment's backup bucket, the evidence bucket, and the SNS
    topics where each team hears of its releases."""
    ecr = session.client("ecr", endpoint_url=endpoint)
    for service in catalog.services:
        ecr.create_repository(repositoryName=f"{REPOSITORY_PREFIX}/{service.name}")
        for tag in BUILT_TAGS:
            push_image(ecr, service.name, tag)
    ecs = session.client("ecs", endpoint_url=endpoint)
    for cluster in sorted({service.ecs.cluster for _, service in deployments(catalog)}):
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
        # One registry and one task definition family for all environments (one account); a service per cluster.
        for _, deployed in (d for d in deployments(catalog) if d[1].name == service.name):
            ecs.create_service(
                cluster=deployed.ecs.cluster,
                serviceName=deployed.ecs.service,
                taskDefinition=task_definition["taskDefinitionArn"],
                desiredCount=deployed.ecs.desired_count,
                launchType="FARGATE",
            )
    s3 = session.client("s3", endpoint_url=endpoint)
    # The "-unwritable" bucket answers HeadBucket but refuses writes (a devstack fault, see devstack/s3_faults.py).
    buckets = [backup_bucket(catalog, environment) for environment in catalog.environments]
    for bucket in sorted({*buckets, f"{BACKUP_BUCKET}-unwritable", EVIDENCE_BUCKET}):
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    # The catalog names its topics by ARN: one of this account and region is created under its name, which gives
    # that very ARN back (release news is published to it; subscribe a queue to read it).
    sns = session.client("sns", endpoint_url=endpoint)
    for team_name, team in sorted(catalog.teams.items()):
        for arn in team.sns_topics:
            created = sns.create_topic(Name=arn.rsplit(":", 1)[-1])["TopicArn"]
            if created != arn:
                log.warning("team %s's topic %s is not of the devstack's account %s and region %s: created %s "
                            "instead, news to %s will fail (and be logged)", team_name, arn, ACCOUNT, REGION,
                            created, arn)
