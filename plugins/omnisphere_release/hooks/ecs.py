"""ECS service deployments: register a revision, update the service, follow and stop service deployments.

Errors from boto are translated at this boundary into :class:`EcsDeploymentError`, with the service named.
"""

from __future__ import annotations

import math
import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

RUN_TAG = "omnisphere:release-run"
IN_FLIGHT = {"PENDING", "IN_PROGRESS", "STOP_REQUESTED", "ROLLBACK_REQUESTED", "ROLLBACK_IN_PROGRESS"}
# A release may stop waiting once the new revision takes all production traffic: the bake that follows is the
# monitoring gate's window, and a failure then stops the deployment with ROLLBACK, which ECS does at once.
TRAFFIC_SHIFTED_STAGES = {"BAKE_TIME", "CLEAN_UP"}
# Fields of DescribeTaskDefinition that RegisterTaskDefinition accepts back.
REGISTERABLE = ("family", "taskRoleArn", "executionRoleArn", "networkMode", "containerDefinitions", "volumes",
                "placementConstraints", "requiresCompatibilities", "cpu", "memory", "pidMode", "ipcMode",
                "proxyConfiguration", "inferenceAccelerators", "ephemeralStorage", "runtimePlatform")


class EcsDeploymentError(RuntimeError):
    """An ECS call failed or ECS is in a state the release cannot work with."""


def deployment_configuration(strategy: str, bake_minutes: float) -> dict[str, Any]:
    """Return ECS's deploymentConfiguration for a release strategy (bake times are whole minutes for ECS)."""
    bake = max(0, math.ceil(bake_minutes))
    if strategy == "rolling":
        return {"strategy": "ROLLING", "maximumPercent": 200, "minimumHealthyPercent": 100,
                "deploymentCircuitBreaker": {"enable": True, "rollback": True}}
    if strategy == "blue_green":
        return {"strategy": "BLUE_GREEN", "bakeTimeInMinutes": bake}
    if strategy == "canary":
        return {"strategy": "CANARY", "bakeTimeInMinutes": bake,
                "canaryConfiguration": {"canaryPercent": 10.0, "canaryBakeTimeInMinutes": max(1, bake // 2)}}
    if strategy == "linear":
        return {"strategy": "LINEAR", "bakeTimeInMinutes": bake,
                "linearConfiguration": {"stepPercent": 25.0, "stepBakeTimeInMinutes": max(1, bake // 4)}}
    raise ValueError(f"unknown strategy {strategy!r}; use rolling, blue_green, canary or linear")


def image_of(task_definition: dict[str, Any], container: str) -> str:
    for definition in task_definition.get("containerDefinitions", []):
        if definition["name"] == container:
            return definition["image"]
    raise EcsDeploymentError(f"task definition {task_definition.get('taskDefinitionArn')} has no container "
                             f"{container!r}; check ecs.container in the catalog")


def with_image(image: str, tag: str) -> str:
    """Return ``image`` with its tag replaced by ``tag`` (a digest reference loses its digest)."""
    repository = image.split("@", 1)[0]
    name_start = repository.rfind("/") + 1
    if ":" in repository[name_start:]:
        repository = repository[: repository.rfind(":")]
    return f"{repository}:{tag}"


class EcsDeploymentHook:
    """Thin, typed access to the ECS calls a release makes."""

    def __init__(self, aws_conn_id: str | None = "aws_default", region_name: str | None = None,
                 client: Any | None = None) -> None:
        if client is None:
            from airflow.providers.amazon.aws.hooks.ecs import EcsHook

            client = EcsHook(aws_conn_id=aws_conn_id, region_name=region_name).conn
        self.client = client

    def _call(self, what: str, method: str, **kwargs: Any) -> dict[str, Any]:
        try:
            return getattr(self.client, method)(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise EcsDeploymentError(f"{what}: {exc}") from None

    def describe_service(self, cluster: str, service: str) -> dict[str, Any]:
        response = self._call(f"describe service {cluster}/{service}", "describe_services", cluster=cluster,
                              services=[service])
        services = [s for s in response.get("services", []) if s.get("status") != "INACTIVE"]
        if not services:
            raise EcsDeploymentError(f"ECS service {service} not found in cluster {cluster}; check the catalog's "
                                     f"ecs.cluster and ecs.service")
        return services[0]

    def describe_task_definition(self, arn: str) -> dict[str, Any]:
        response = self._call(f"describe task definition {arn}", "describe_task_definition", taskDefinition=arn,
                              include=["TAGS"])
        return {**response["taskDefinition"], "tags": response.get("tags", [])}

    def register_revision(self, current: dict[str, Any], container: str, image: str, run_tag: str) -> str:
        """Register a revision of ``current`` that differs only by the image of ``container``."""
        image_of(current, container)  # the container must exist
        fields = {key: current[key] for key in REGISTERABLE if current.get(key) not in (None, [], {})}
        fields["containerDefinitions"] = [
            {**definition, "image": image} if definition["name"] == container else definition
            for definition in current["containerDefinitions"]
        ]
        tags = [t for t in current.get("tags", []) if t["key"] != RUN_TAG] + [{"key": RUN_TAG, "value": run_tag}]
        response = self._call(f"register a revision of {current.get('family')}", "register_task_definition",
                              **fields, tags=tags)
        return response["taskDefinition"]["taskDefinitionArn"]

    def find_revision_of_run(self, family: str, run_tag: str, look_back: int = 10) -> str | None:
        """Return the revision a previous try of this run registered, so that a retry reattaches to it."""
        response = self._call(f"list revisions of {family}", "list_task_definitions", familyPrefix=family,
                              sort="DESC", maxResults=look_back)
        for arn in response.get("taskDefinitionArns", []):
            tags = self.describe_task_definition(arn).get("tags", [])
            if {"key": RUN_TAG, "value": run_tag} in tags:
                return arn
        return None

    def update_service(self, cluster: str, service: str, task_definition: str,
                       configuration: dict[str, Any]) -> str:
        """Start a service deployment to ``task_definition``; return the service deployment ARN."""
        response = self._call(f"update service {cluster}/{service}", "update_service", cluster=cluster,
                              service=service, taskDefinition=task_definition,
                              deploymentConfiguration=configuration)
        arn = response["service"].get("currentServiceDeployment")
        return arn or self.latest_deployment(cluster, service)["serviceDeploymentArn"]

    def latest_deployment(self, cluster: str, service: str) -> dict[str, Any]:
        response = self._call(f"list deployments of {cluster}/{service}", "list_service_deployments",
                              cluster=cluster, service=service, maxResults=1)
        if not response.get("serviceDeployments"):
            raise EcsDeploymentError(f"ECS service {cluster}/{service} has no service deployment")
        return response["serviceDeployments"][0]

    def describe_deployment(self, arn: str) -> dict[str, Any]:
        response = self._call(f"describe deployment {arn}", "describe_service_deployments",
                              serviceDeploymentArns=[arn])
        if not response.get("serviceDeployments"):
            raise EcsDeploymentError(f"service deployment {arn} not found: {response.get('failures')}")
        return response["serviceDeployments"][0]

    def stop_with_rollback(self, arn: str) -> None:
        self._call(f"stop deployment {arn} with ROLLBACK", "stop_service_deployment", serviceDeploymentArn=arn,
                   stopType="ROLLBACK")

    def wait_until_settled(self, arn: str, timeout_seconds: float, poll_seconds: float = 2.0) -> dict[str, Any]:
        """Poll a deployment until it leaves the in-flight states; raise EcsDeploymentError on timeout."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            deployment = self.describe_deployment(arn)
            if deployment["status"] not in IN_FLIGHT:
                return deployment
            if time.monotonic() > deadline:
                raise EcsDeploymentError(f"deployment {arn} still {deployment['status']} after "
                                         f"{timeout_seconds:.0f}s")
            time.sleep(poll_seconds)


def summarize(deployment: dict[str, Any]) -> str:
    """Return one line about a service deployment for the log."""
    target = deployment.get("targetServiceRevision") or {}
    return (f"{deployment.get('status')} at {deployment.get('lifecycleStage', '?')}: "
            f"{target.get('runningTaskCount', '?')}/{target.get('requestedTaskCount', '?')} new tasks running, "
            f"{target.get('requestedProductionTrafficWeight', '?')}% of traffic; {deployment.get('statusReason', '')}")
