"""ECS service deployments: register a revision, update the service, follow and stop service deployments.

Errors from boto are translated at this boundary into :class:`EcsDeploymentError`, with the service named.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from omnisphere_release.hooks.cloudwatch import stream_label
from omnisphere_release.hooks.registry import DIGEST_PATTERN

RUN_TAG = "omnisphere:release-run"
IN_FLIGHT = {"PENDING", "IN_PROGRESS", "STOP_REQUESTED", "ROLLBACK_REQUESTED", "ROLLBACK_IN_PROGRESS"}
# A release may stop waiting once the new revision takes all production traffic: the bake that follows is the
# monitoring gate's window, and a failure then stops the deployment with ROLLBACK, which ECS does at once.
TRAFFIC_SHIFTED_STAGES = {"BAKE_TIME", "CLEAN_UP"}
# Fields of DescribeTaskDefinition that RegisterTaskDefinition accepts back.
REGISTERABLE = ("family", "taskRoleArn", "executionRoleArn", "networkMode", "containerDefinitions", "volumes",
                "placementConstraints", "requiresCompatibilities", "cpu", "memory", "pidMode", "ipcMode",
                "proxyConfiguration", "inferenceAccelerators", "ephemeralStorage", "runtimePlatform",
                "enableFaultInjection", "trustedExecutionConfiguration")
DIGEST = re.compile(DIGEST_PATTERN)
STEPPED = ("canary", "linear")
TEST_TRAFFIC_STAGE = "POST_TEST_TRAFFIC_SHIFT"
HOOK_STATUS_PREFIX_KEY = "statusParameterPrefix"  # the strategies that shift production traffic in steps
EXAMPLE_STEPS = '[{"percent": 10, "bake_minutes": 5}, {"percent": 100, "bake_minutes": 10}]'


class EcsDeploymentError(RuntimeError):
    """An ECS call failed or ECS is in a state the release cannot work with."""


class EcsNotOnTarget(EcsDeploymentError):
    """The service settled on another revision than the one asked for: a fact about the service, not a glitch."""


def deployment_configuration(strategy: str, bake_minutes: float,
                             steps: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Return ECS's deploymentConfiguration for a release strategy (bake times are whole minutes for ECS).

    ``steps`` (canary and linear: ``{"percent", "bake_minutes"}`` each, see :func:`steps_problem`) become ECS's own
    canaryConfiguration or linearConfiguration, and the last step's bake ECS's bakeTimeInMinutes. Without steps,
    canary and linear keep their fixed shape: 10 % for half the bake, or 25 % per step for a quarter of it each.
    """
    bake = max(0, math.ceil(bake_minutes))
    if steps and strategy in STEPPED:
        if problem := steps_problem(strategy, steps):
            raise ValueError(problem)
        first, last = steps[0], steps[-1]
        config: dict[str, Any] = {"strategy": strategy.upper(), "bakeTimeInMinutes": whole(last["bake_minutes"])}
        if strategy == "canary":
            config["canaryConfiguration"] = {"canaryPercent": float(first["percent"]),
                                             "canaryBakeTimeInMinutes": whole(first["bake_minutes"])}
        else:
            config["linearConfiguration"] = {"stepPercent": float(first["percent"]),
                                             "stepBakeTimeInMinutes": whole(first["bake_minutes"])}
        return config
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


def whole(minutes: Any) -> int:
    """Return a bake in the whole minutes ECS takes (rounded up: a step is never watched for less than asked)."""
    return max(0, math.ceil(float(minutes)))


def steps_problem(strategy: str, steps: Sequence[Mapping[str, Any]]) -> str | None:
    """Return why ``steps`` cannot be a ``strategy`` deployment's traffic steps, or None when ECS can run them.

    The catalog's rule first (percents rising strictly to 100, bakes of 0 to 24 h), then ECS's own: its CANARY
    shifts one share and, after the canary bake, all the rest (steps ``[p, 100]``); its LINEAR shifts equal shares
    with equal bakes (``[25, 50, 75, 100]``: the last step's bake is the bake at 100 %). Anything else (10, 50, 100)
    needs traffic weights driven outside ECS, which this release does not do: it says so rather than run other
    steps than asked.
    """
    if strategy not in STEPPED:
        return f"steps are for canary and linear deployments, not {strategy}"
    try:
        percents = [int(step["percent"]) for step in steps]
        bakes = [float(step["bake_minutes"]) for step in steps]
    except (KeyError, TypeError, ValueError):
        return f"steps {list(steps)!r}: each step needs a whole percent and bake_minutes, e.g. {EXAMPLE_STEPS}"
    if not percents or percents != sorted(set(percents)) or percents[-1] != 100 or percents[0] < 1:
        return f"steps {percents} must rise strictly from at least 1 and end at 100, e.g. {EXAMPLE_STEPS}"
    if any(not 0 <= bake <= 24 * 60 for bake in bakes):
        return f"step bakes {bakes} must each be 0 to 1440 minutes"
    if strategy == "canary" and len(percents) != 2:
        return (f"canary steps {percents}: ECS's CANARY shifts one share, then after its bake all the rest, so a "
                f"canary has two steps, [p, 100]; for more steps use linear with equal shares (e.g. 25, 50, 75, 100)")
    share = percents[0]
    if strategy == "linear" and (any(b - a != share for a, b in zip([0, *percents], percents, strict=False))
                                 or len({whole(b) for b in bakes[:-1]}) > 1):
        return (f"linear steps {percents} with bakes {bakes}: ECS's LINEAR shifts equal shares with equal bakes, "
                f"so every step must add {share} % and every step but the last bake as long as the first")
    return None


def steps_of(configuration: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return the traffic steps of an ECS deploymentConfiguration (``{"percent", "bake_minutes"}`` each), as ECS
    runs them: empty for ROLLING and BLUE_GREEN (one switch)."""
    strategy = str(configuration.get("strategy", "")).upper()
    final = float(configuration.get("bakeTimeInMinutes") or 0)
    if strategy == "CANARY":
        canary = configuration.get("canaryConfiguration") or {}
        return [{"percent": float(canary.get("canaryPercent") or 5.0),
                 "bake_minutes": float(canary.get("canaryBakeTimeInMinutes") or 0)},
                {"percent": 100.0, "bake_minutes": final}]
    if strategy == "LINEAR":
        linear = configuration.get("linearConfiguration") or {}
        share = float(linear.get("stepPercent") or 10.0)
        count = math.ceil(100 / share)
        return [{"percent": min(100.0, share * (i + 1)),
                 "bake_minutes": final if i == count - 1 else float(linear.get("stepBakeTimeInMinutes") or 0)}
                for i in range(count)]
    return []


def parse_steps(value: Any, where: str = "steps") -> list[dict[str, Any]]:
    """Return a run's steps from a param (a list, or its JSON text as a rendered template gives it; empty or
    ``None``: no override); raise ValueError naming ``where`` when it is not a list of steps."""
    if value in (None, "", "None", "null", "[]"):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not JSON; give a list like {EXAMPLE_STEPS}") from None
    if not isinstance(value, list) or not all(isinstance(step, Mapping) for step in value):
        raise ValueError(f"{where}: {value!r} is not a list of steps; give a list like {EXAMPLE_STEPS}")
    return [dict(step) for step in value]


def image_of(task_definition: dict[str, Any], container: str) -> str:
    for definition in task_definition.get("containerDefinitions", []):
        if definition["name"] == container:
            return definition["image"]
    raise EcsDeploymentError(f"task definition {task_definition.get('taskDefinitionArn')} has no container "
                             f"{container!r}; check ecs.container in the catalog")


def repository_of(image: str) -> str:
    """Return the repository of an image reference: ``image`` without its tag and digest."""
    repository = image.split("@", 1)[0]
    name_start = repository.rfind("/") + 1  # a registry's port (localhost:5000/...) is not a tag
    if ":" in repository[name_start:]:
        repository = repository[: repository.rfind(":")]
    return repository


def with_log_stream_prefix(definition: dict[str, Any], image: str) -> dict[str, Any]:
    """Return a container definition whose awslogs streams are named after ``image``, so that the monitoring gate
    reads the new task set's streams only (hooks.cloudwatch.log_stream_prefix); other log drivers are left as they
    are."""
    config = definition.get("logConfiguration") or {}
    if config.get("logDriver") != "awslogs":
        return definition
    options = {**config.get("options", {}), "awslogs-stream-prefix": stream_label(image)}
    return {**definition, "logConfiguration": {**config, "options": options}}


def with_image(image: str, tag: str) -> str:
    """Return ``image`` with its tag replaced by ``tag`` (a digest reference loses its digest)."""
    return f"{repository_of(image)}:{tag}"


def pinned_image(image: str, digest: str | None) -> str:
    """Return ``image`` referenced by ``digest`` (``<repository>@sha256:...``), or ``image`` as it is without one.

    A tag can be pushed again at any time; a digest names one image for good, so ECS starts exactly the image the
    registry check saw, however often the tag moves afterwards.
    """
    if not digest:
        return image
    if not DIGEST.fullmatch(digest):
        raise ValueError(f"image digest {digest!r} of {image}: expected sha256: and 64 hex digits, as ECR reports it")
    return f"{repository_of(image)}@{digest}"


@dataclass(frozen=True)
class LiveRevision:
    """What a service runs now: the service as described, its task definition, and its container's image."""

    service: dict[str, Any]
    task_definition: dict[str, Any]
    image: str

    @property
    def arn(self) -> str:
        return str(self.service["taskDefinition"])

    @property
    def deploying(self) -> bool:
        """Whether an ECS deployment of the service is in progress (not a state for another one to start from)."""
        return any(d.get("rolloutState") == "IN_PROGRESS" for d in self.service.get("deployments", []))


@dataclass(frozen=True)
class ReturnStep:
    """One step of :meth:`EcsDeploymentHook.return_to`: what it did, and the deployment to wait for before the next."""

    action: str | None  # "stopped in-flight deployment with ROLLBACK", "redeployed <arn>", or None (nothing done)
    wait_for: str | None  # the service deployment to wait for (until it leaves flight); None: on target, settled


class EcsDeploymentHook:
    """Thin, typed access to the ECS calls a release makes."""

    def __init__(self, aws_conn_id: str | None = "aws_default", region_name: str | None = None,
                 client: Any | None = None) -> None:
        self.aws_conn_id, self.region_name = aws_conn_id, region_name
        if client is None:
            from omnisphere_release.hooks.aws import aws_client

            client = aws_client("ecs", aws_conn_id, region_name)
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

    def live_revision(self, cluster: str, service: str, container: str) -> LiveRevision:
        """Return what ``service`` runs now (the one lookup preflight, manual rollback and release_all share)."""
        live = self.describe_service(cluster, service)
        task_definition = self.describe_task_definition(live["taskDefinition"])
        return LiveRevision(live, task_definition, image_of(task_definition, container))

    def describe_task_definition(self, arn: str) -> dict[str, Any]:
        response = self._call(f"describe task definition {arn}", "describe_task_definition", taskDefinition=arn,
                              include=["TAGS"])
        return {**response["taskDefinition"], "tags": response.get("tags", [])}

    def register_revision(self, current: dict[str, Any], container: str, image: str, run_tag: str) -> str:
        """Register a revision of ``current`` that differs only by the image of ``container``."""
        image_of(current, container)  # the container must exist
        fields = {key: current[key] for key in REGISTERABLE if current.get(key) not in (None, [], {})}
        fields["containerDefinitions"] = [
            with_log_stream_prefix({**definition, "image": image}, image) if definition["name"] == container
            else definition
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

    def task_set_target_groups(self, cluster: str, service: str) -> tuple[str | None, str | None]:
        """Return the CloudWatch TargetGroup dimensions of the service's production and alternate target groups
        (``targetgroup/<name>/<id>``), as its load balancer configuration names them (None where it names none).

        With ECS's native blue/green, canary and linear, the new revision's tasks register in the alternate target
        group while the old ones stay in the production one: the ALB's per-target-group metrics are then the two
        task sets' own, which is what lets a step compare them.
        """
        for balancer in self.describe_service(cluster, service).get("loadBalancers") or []:
            production = balancer.get("targetGroupArn")
            alternate = (balancer.get("advancedConfiguration") or {}).get("alternateTargetGroupArn")
            if production:
                return target_group_dimension(production), target_group_dimension(alternate) if alternate else None
        return None, None

    def answer_lifecycle_hook(self, parameter: str, status: str) -> None:
        """Answer a deployment's lifecycle hook (SUCCEEDED: go on; FAILED: ECS rolls back): write ``status`` to the
        SSM parameter the platform's hook function reads (:func:`traffic_hook_prefix`)."""
        from omnisphere_release.hooks.aws import aws_client

        try:
            aws_client("ssm", self.aws_conn_id, self.region_name).put_parameter(
                Name=parameter, Value=status, Type="String", Overwrite=True)
        except (ClientError, BotoCoreError) as exc:
            raise EcsDeploymentError(f"answer lifecycle hook {parameter} with {status}: {exc}") from None

    def stop_with_rollback(self, arn: str) -> None:
        self._call(f"stop deployment {arn} with ROLLBACK", "stop_service_deployment", serviceDeploymentArn=arn,
                   stopType="ROLLBACK")

    def return_to(self, cluster: str, service: str, task_definition: str, redeployed: bool = False) -> ReturnStep:
        """Take the next step that brings ``service`` to ``task_definition``: the one way back, for the release's
        rollback_ecs and for rollback_<service> alike (as in ecs-deploy, a rollback is a deploy of the old revision).

        It never waits: it returns the deployment to wait for (the caller defers to EcsServiceDeploymentTrigger until
        that deployment leaves flight), then calls it again, until it returns nothing to wait for.

        - A deployment in flight to another revision is stopped with ROLLBACK (ECS then returns to the revision it
          started from, at once); one already rolling back, or going to the target, is only waited for.
        - Settled on another revision: the target is deployed (rolling, circuit breaker on), unless ``redeployed``
          says an earlier step did so already; then the service ended elsewhere, and EcsNotOnTarget says where.
        - On the target with nothing in flight: nothing is done, so running it twice changes nothing.
        """
        live = self.describe_service(cluster, service)
        arn = live.get("currentServiceDeployment")
        deployment = self.describe_deployment(arn) if arn else None
        if arn and deployment and deployment["status"] in IN_FLIGHT:
            # UpdateService sets the service's task definition at once: it names where the deployment goes (the
            # deployment's targetServiceRevision is a service revision ARN, never a task definition's).
            if not deployment["status"].startswith("ROLLBACK") and live["taskDefinition"] != task_definition:
                self.stop_with_rollback(arn)
                return ReturnStep("stopped in-flight deployment with ROLLBACK", arn)
            return ReturnStep(None, arn)
        if live["taskDefinition"] != task_definition:
            if redeployed:
                raise EcsNotOnTarget(f"ECS service {cluster}/{service} ended on {live['taskDefinition']}, not "
                                     f"{task_definition}" + (f" ({summarize(deployment)})" if deployment else ""))
            arn = self.update_service(cluster, service, task_definition, deployment_configuration("rolling", 0))
            return ReturnStep(f"redeployed {task_definition}", arn)
        return ReturnStep(None, None)


def lifecycle_hooks(live_service: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the lifecycle hooks set on a service (by the platform's IaC): a release's UpdateService keeps them."""
    return list((live_service.get("deploymentConfiguration") or {}).get("lifecycleHooks") or [])


def traffic_hook_prefix(hooks: list[dict[str, Any]]) -> str | None:
    """Return the SSM parameter prefix of the platform's hook at POST_TEST_TRAFFIC_SHIFT, or None without one.

    ECS holds a blue/green deployment at POST_TEST_TRAFFIC_SHIFT (green up, the test listener on it, production
    still on blue) until each hook of that stage answers. The platform's hook function answers what the release
    wrote to ``<hookDetails.statusParameterPrefix>/<deployment id>`` in SSM, IN_PROGRESS meanwhile: that is how
    the release smoke-tests green on the test listener before the production switch, and refuses it.
    """
    for hook in hooks:
        prefix = (hook.get("hookDetails") or {}).get(HOOK_STATUS_PREFIX_KEY)
        if TEST_TRAFFIC_STAGE in (hook.get("lifecycleStages") or []) and prefix:
            return str(prefix).rstrip("/")
    return None


def target_group_dimension(arn: str) -> str:
    """Return the CloudWatch ``TargetGroup`` dimension of a target group ARN: its ``targetgroup/...`` part."""
    return arn[arn.index("targetgroup/"):] if "targetgroup/" in arn else arn


def traffic_weight(deployment: dict[str, Any]) -> float:
    """Return the share of production traffic (percent) ECS reports on the deployment's new revision."""
    weight = (deployment.get("targetServiceRevision") or {}).get("requestedProductionTrafficWeight")
    return float(weight) if weight is not None else (100.0 if deployment.get("status") == "SUCCESSFUL" else 0.0)


def summarize(deployment: dict[str, Any]) -> str:
    """Return one line about a service deployment for the log."""
    target = deployment.get("targetServiceRevision") or {}
    return (f"{deployment.get('status')} at {deployment.get('lifecycleStage', '?')}: "
            f"{target.get('runningTaskCount', '?')}/{target.get('requestedTaskCount', '?')} new tasks running, "
            f"{target.get('requestedProductionTrafficWeight', '?')}% of traffic; {deployment.get('statusReason', '')}")
