"""An ECS deployment simulator that runs inside the devstack's moto server.

moto keeps an ECS service static: ``update_service`` swaps the task definition and reports every task running at
once. Real ECS starts a *service deployment* that ramps new tasks up and old ones down over minutes, may fail through
the circuit breaker, and, for BLUE_GREEN / CANARY / LINEAR, shifts traffic in stages with bake times. The release
orchestrator must be tested against that behaviour, so this module patches moto's ECS backend to:

- turn ``UpdateService`` into a deployment that advances one step every ``step_seconds`` (PRIMARY / ACTIVE deployments,
  running counts that ramp, ``rolloutState`` IN_PROGRESS -> COMPLETED or FAILED);
- honour ``deploymentConfiguration``: ROLLING with ``deploymentCircuitBreaker`` (enable / rollback), BLUE_GREEN with
  ``bakeTimeInMinutes``, CANARY with ``canaryConfiguration``, LINEAR with ``linearConfiguration``;
- answer ``DescribeServiceDeployments``, ``ListServiceDeployments`` and ``StopServiceDeployment`` (ROLLBACK, ABORT).

Faults are chosen by the image tag, so a test picks its failure by the tag it deploys (an image deployed by digest,
as releases do, by the tag it was pushed as: see devstack/ecr.py):
``-crashloop`` tasks never start (the deployment FAILS once the circuit breaker trips, or for the traffic-shifting
strategies during SCALE_UP); ``-unhealthy`` and ``-errors`` start fine and are acted out by the sample services.

Time is compressed: one simulated minute of bake time lasts ``minute_seconds`` real seconds.
This is test infrastructure: plugins/ and dags/ never import it.
"""

from __future__ import annotations

import math
import random
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from moto.core.responses import ActionResult
from moto.ecs import models as ecs_models
from moto.ecs import responses as ecs_responses
from moto.ecs.exceptions import EcsClientException, InvalidParameterException
from moto.moto_api._internal import mock_random

from devstack.ecr import tag_of

IN_PROGRESS_STATES = {"PENDING", "IN_PROGRESS", "ROLLBACK_REQUESTED", "ROLLBACK_IN_PROGRESS", "STOP_REQUESTED"}


def image_tag(image: str) -> str:
    """Return the tag of an image reference: ``repo/name:tag`` -> ``tag``, no tag -> ``latest``, and a digest reference
    (``repo/name@sha256:...``, as a release deploys) -> the tag its image was pushed as in the local registry (a digest
    the registry never had stays the digest: no fault)."""
    reference, _, digest = image.partition("@")
    name = reference.rsplit("/", 1)[-1]
    tag = name.split(":", 1)[1] if ":" in name else None
    if digest:
        return tag_of(image) or tag or digest
    return tag or "latest"


class ServedImage(str):
    """The image that answers one request, and whether it is the new task set of a stepped (CANARY or LINEAR)
    deployment in flight: those tasks sit in the service's alternate target group, whose load balancer metrics are
    theirs alone (see :func:`alternate_target_group`)."""

    new_task_set: bool = False

    @classmethod
    def of(cls, image: str | None, new_task_set: bool = False) -> ServedImage | None:
        if image is None:
            return None
        served = cls(image)
        served.new_task_set = new_task_set
        return served


def alternate_target_group(target_group: str) -> str:
    """Return the devstack's alternate target group of a catalog target group (``targetgroup/<name>/<id>``): where
    ECS registers the new revision's tasks during a blue/green, canary or linear deployment."""
    _, name, ident = target_group.split("/", 2)
    return f"targetgroup/{name[:26]}-green/{ident[::-1]}"


# The listener a sample service request came in on: "production" or "test" (the sample service's test listener sets
# it for the request's thread), so that serving_image answers as that listener's rule forwards.
LISTENER: ContextVar[str] = ContextVar("listener", default="production")
HOOK_STATUS_PREFIX = "/omnisphere/ecs-lifecycle-hooks"


def traffic_test_hook(service_arn: str) -> dict[str, Any]:
    """Return the lifecycle hook the devstack gives every service behind a load balancer: at POST_TEST_TRAFFIC_SHIFT
    ECS waits for the platform's hook function, which answers what the release wrote to SSM (see _run_hooks)."""
    region, account = service_arn.split(":")[3:5]
    return {"hookTargetArn": f"arn:aws:lambda:{region}:{account}:function:omnisphere-release-hook",
            "roleArn": f"arn:aws:iam::{account}:role/ecsLifecycleHookInvoke",
            "lifecycleStages": ["POST_TEST_TRAFFIC_SHIFT"],
            "hookDetails": {"statusParameterPrefix": HOOK_STATUS_PREFIX}}


def _ssm_value(arn: str, name: str) -> str | None:
    """Return an SSM parameter's value, in the account and region of ``arn``, from the moto server this simulator
    runs in (None: no such parameter)."""
    from moto.ssm.models import ssm_backends

    region, account = arn.split(":")[3:5]
    parameter = ssm_backends[account][region].get_parameter(name)
    return None if parameter is None else str(parameter.value)


def _target_group_arn(region: str, account: str, dimension: str) -> str:
    return f"arn:aws:elasticloadbalancing:{region}:{account}:{dimension}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class SimDeployment:
    """One service deployment: the move of a service from ``source_td`` to ``target_td``."""

    arn: str
    legacy_id: str  # the ``ecs-svc/...`` id of the Deployment entry in DescribeServices
    service_key: str
    service_arn: str
    cluster_arn: str
    source_td: str | None
    target_td: str
    target_image: str
    source_image: str | None
    desired: int
    config: dict[str, Any]
    strategy: str
    created_at: datetime = field(default_factory=_now)
    updated_at: datetime = field(default_factory=_now)
    finished_at: datetime | None = None
    stopped_at: datetime | None = None
    status: str = "IN_PROGRESS"
    status_reason: str = "ECS deployment in progress."
    stage: str = "SCALE_UP"
    stage_since: float = field(default_factory=time.monotonic)
    new_running: int = 0
    old_running: int = 0
    failed_tasks: int = 0
    traffic: float = 0.0  # percent of production traffic on the target revision
    rollback: dict[str, Any] | None = None

    @property
    def crashloop(self) -> bool:
        return image_tag(self.target_image).endswith("-crashloop")

    @property
    def breaker(self) -> dict[str, Any]:
        return self.config.get("deploymentCircuitBreaker") or {}

    @property
    def breaker_threshold(self) -> int:
        # ECS: 0.5 * desired count, at least 3 and at most 200.
        return max(3, min(200, math.ceil(0.5 * self.desired)))

    def touch(self) -> None:
        self.updated_at = _now()

    def enter(self, stage: str) -> None:
        self.stage = stage
        self.stage_since = time.monotonic()
        self.touch()


class EcsDeploymentSimulator:
    """Patch moto's ECS backend so that services deploy the way ECS does, one step per ``step_seconds``."""

    def __init__(self, step_seconds: float = 0.3, minute_seconds: float = 1.0) -> None:
        self.step_seconds = step_seconds
        self.minute_seconds = minute_seconds
        self.deployments: dict[str, SimDeployment] = {}  # by ARN, in creation order
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- installation -------------------------------------------------------------------------------------------
    def install(self) -> None:
        simulator = self
        backend_cls = ecs_models.EC2ContainerServiceBackend
        original_update = backend_cls.update_service
        original_describe = backend_cls.describe_services

        def update_service(backend: Any, service_properties: dict[str, Any]) -> Any:
            return simulator.update_service(backend, original_update, service_properties)

        def describe_services(backend: Any, cluster_str: str, names: list[str]) -> Any:
            simulator.tick()
            return original_describe(backend, cluster_str, names)

        backend_cls.update_service = update_service
        backend_cls.describe_services = describe_services
        response_cls = ecs_responses.EC2ContainerServiceResponse
        response_cls.describe_service_deployments = lambda r: simulator.describe_service_deployments(r)
        response_cls.list_service_deployments = lambda r: simulator.list_service_deployments(r)
        response_cls.stop_service_deployment = lambda r: simulator.stop_service_deployment(r)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ecs-deployment-simulator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.step_seconds):
            self.tick()

    # ---- UpdateService -----------------------------------------------------------------------------------------
    def update_service(self, backend: Any, original_update: Any, props: dict[str, Any]) -> Any:
        with self.lock:
            cluster = backend._get_cluster(props.get("cluster", "default"))
            service_name = props["service"].split("/")[-1]
            service = backend._get_service(cluster.name, service_name)
            before_td = service.task_definition
            deployment_config = props.get("deployment_configuration")
            force = bool(props.get("force_new_deployment"))
            desired = props.get("desired_count")
            result = original_update(backend, dict(props))
            # moto marks every task running at once; the simulator owns the counts from here on.
            if deployment_config is not None:
                service.deployment_configuration = deployment_config
            if desired is not None:
                service.desired_count = desired
            target_td = service.task_definition
            if target_td and (target_td != before_td or force):
                target = backend.describe_task_definition(target_td)
                service.task_definition = target.arn
                self._start_deployment(backend, service, target, before_td)
            self._refresh_service(service)
            return result

    def _start_deployment(self, backend: Any, service: Any, target: Any, before_td: str | None) -> None:
        key = f"{service.cluster_name}:{service.name}"
        serving = self._serving_deployment(key)
        for running in self._deployments_of(key):
            if running.status in IN_PROGRESS_STATES:
                running.status = "STOPPED"
                running.status_reason = "Superseded by a newer service deployment."
                running.stopped_at = running.finished_at = _now()
                running.touch()
        if serving is not None:
            source_td, source_image = serving.target_td, serving.target_image
        else:  # the service's first deployment through the simulator: its source is what moto was serving
            source_td = before_td
            source_image = _first_image(backend.describe_task_definition(before_td)) if before_td else None
        config = dict(getattr(service, "deployment_configuration", None) or {})
        deployment_id = f"{mock_random.randint(10**17, 10**18 - 1)}"
        sim = SimDeployment(
            arn=f"arn:aws:ecs:{backend.region_name}:{backend.account_id}:service-deployment/"
            f"{service.cluster_name}/{service.name}/{deployment_id}",
            legacy_id=f"ecs-svc/{deployment_id}",
            service_key=key,
            service_arn=service.arn,
            cluster_arn=service.cluster_arn,
            source_td=source_td,
            target_td=target.arn,
            target_image=_first_image(target),
            source_image=source_image,
            desired=max(1, service.desired_count),
            config=config,
            strategy=(config.get("strategy") or "ROLLING").upper(),
        )
        sim.old_running = sim.desired if source_td else 0
        sim.status_reason = f"ECS deployment {sim.legacy_id} in progress."
        self.deployments[sim.arn] = sim
        service.events.insert(0, _event(f"(service {service.name}) has started a {sim.strategy} deployment "
                                        f"{sim.legacy_id} to {target.family}:{target.revision}."))

    # ---- simulation ---------------------------------------------------------------------------------------------
    def tick(self) -> None:
        with self.lock:
            for sim in list(self.deployments.values()):
                if sim.status in IN_PROGRESS_STATES and time.monotonic() - sim.stage_since >= self.step_seconds:
                    self._advance(sim)
            for backend in _ecs_backends():
                for service in backend.services.values():
                    self._refresh_service(service)

    def _advance(self, sim: SimDeployment) -> None:
        if sim.status in {"ROLLBACK_REQUESTED", "ROLLBACK_IN_PROGRESS"}:
            return self._advance_rollback(sim)
        if sim.status == "STOP_REQUESTED":
            sim.status, sim.stopped_at, sim.finished_at = "STOPPED", _now(), _now()
            sim.status_reason = "Service deployment stopped by request (ABORT)."
            return sim.touch()
        if sim.stage == "SCALE_UP":
            return self._scale_up(sim)
        if sim.stage == "TEST_TRAFFIC_SHIFT":  # the test listener now forwards to the new (green) tasks
            return sim.enter("POST_TEST_TRAFFIC_SHIFT")
        if sim.stage == "POST_TEST_TRAFFIC_SHIFT":
            return self._run_hooks(sim, "POST_TEST_TRAFFIC_SHIFT", "PRODUCTION_TRAFFIC_SHIFT")
        if sim.stage == "PRODUCTION_TRAFFIC_SHIFT":
            return self._shift_traffic(sim)
        if sim.stage in {"CANARY_BAKE", "LINEAR_BAKE"}:
            minutes = self._bake_minutes(sim, sim.stage)
            if time.monotonic() - sim.stage_since >= minutes * self.minute_seconds:
                sim.enter("PRODUCTION_TRAFFIC_SHIFT")
            return None
        if sim.stage == "BAKE_TIME":
            minutes = float(sim.config.get("bakeTimeInMinutes") or 0)
            if time.monotonic() - sim.stage_since >= minutes * self.minute_seconds:
                sim.enter("CLEAN_UP")
            return None
        if sim.stage == "CLEAN_UP":
            sim.old_running = max(0, sim.old_running - max(1, sim.desired // 2))
            sim.touch()
            if sim.old_running == 0:
                self._succeed(sim)
        return None

    def _scale_up(self, sim: SimDeployment) -> None:
        sim.stage_since = time.monotonic()
        if sim.crashloop:
            sim.failed_tasks += 1
            sim.touch()
            uses_breaker = sim.strategy != "ROLLING" or sim.breaker.get("enable")
            if uses_breaker and sim.failed_tasks >= sim.breaker_threshold:
                self._fail(sim, f"ECS deployment circuit breaker: tasks failed to start "
                                f"({sim.failed_tasks} failed, threshold {sim.breaker_threshold}).")
            return
        if sim.strategy == "ROLLING":
            max_total = math.floor(sim.desired * int(sim.config.get("maximumPercent") or 200) / 100)
            if sim.new_running < sim.desired and sim.new_running + sim.old_running < max_total:
                sim.new_running += 1
            elif sim.old_running > 0:
                sim.old_running -= 1
            sim.traffic = 100.0 * sim.new_running / max(1, sim.new_running + sim.old_running)
            if sim.new_running >= sim.desired and sim.old_running == 0:
                self._succeed(sim)
            sim.touch()
            return
        sim.new_running = min(sim.desired, sim.new_running + 1)
        sim.touch()
        if sim.new_running >= sim.desired:
            sim.enter("TEST_TRAFFIC_SHIFT" if sim.strategy == "BLUE_GREEN" else "PRODUCTION_TRAFFIC_SHIFT")

    def _shift_traffic(self, sim: SimDeployment) -> None:
        if sim.strategy == "CANARY":
            canary = float((sim.config.get("canaryConfiguration") or {}).get("canaryPercent") or 5.0)
            if sim.traffic < canary:
                sim.traffic = canary
                return sim.enter("CANARY_BAKE")
        elif sim.strategy == "LINEAR":
            step = float((sim.config.get("linearConfiguration") or {}).get("stepPercent") or 10.0)
            sim.traffic = min(100.0, sim.traffic + step)
            if sim.traffic < 100.0:
                return sim.enter("LINEAR_BAKE")
        sim.traffic = 100.0
        sim.enter("BAKE_TIME")
        return None

    def _run_hooks(self, sim: SimDeployment, stage: str, next_stage: str) -> None:
        """Act out the deployment's lifecycle hooks of ``stage``, as ECS invokes their Lambda functions until each
        answers SUCCEEDED (go on) or FAILED (roll back), holding the deployment in ``stage`` meanwhile.

        The devstack's hook function is the platform's generic one: it answers the hookStatus a release wrote to the
        SSM parameter ``<hookDetails.statusParameterPrefix>/<deployment id>``, IN_PROGRESS while there is none.
        """
        statuses = []
        for hook in sim.config.get("lifecycleHooks") or []:
            if stage in (hook.get("lifecycleStages") or []):
                prefix = (hook.get("hookDetails") or {}).get("statusParameterPrefix", "")
                statuses.append(_ssm_value(sim.arn, f"{prefix}/{sim.arn.rsplit('/', 1)[-1]}") or "IN_PROGRESS")
        if "FAILED" in statuses:
            return self._fail(sim, f"Lifecycle hook at {stage} returned FAILED.")
        if all(status == "SUCCEEDED" for status in statuses):
            sim.enter(next_stage)
        return None

    def test_image(self, cluster: str, service_name: str) -> str | None:
        """Pick the image that answers a request on the service's test listener: the new (green) revision from the
        test traffic shift of a blue/green deployment in flight on, the production image otherwise (as the test
        listener rule forwards to the same target group as production once no deployment is in flight)."""
        with self.lock:
            deployments = self._deployments_of(f"{cluster}:{service_name}")
            sim = deployments[-1] if deployments else None
            if (sim is not None and sim.strategy == "BLUE_GREEN" and sim.status in {"IN_PROGRESS", "PENDING"}
                    and sim.stage not in {"SCALE_UP"}):
                return sim.target_image
        return self.serving_image(cluster, service_name)

    def _bake_minutes(self, sim: SimDeployment, stage: str) -> float:
        if stage == "CANARY_BAKE":
            return float((sim.config.get("canaryConfiguration") or {}).get("canaryBakeTimeInMinutes") or 0)
        return float((sim.config.get("linearConfiguration") or {}).get("stepBakeTimeInMinutes") or 0)

    def _succeed(self, sim: SimDeployment) -> None:
        sim.status, sim.finished_at = "SUCCESSFUL", _now()
        sim.new_running, sim.old_running, sim.traffic = sim.desired, 0, 100.0
        sim.status_reason = f"ECS deployment {sim.legacy_id} completed."
        sim.enter("CLEAN_UP")
        service = self._service(sim)
        if service is not None:
            service.events.insert(0, _event(f"(service {service.name}) has reached a steady state."))

    def _fail(self, sim: SimDeployment, reason: str) -> None:
        rollback = sim.strategy != "ROLLING" or sim.breaker.get("rollback")
        sim.status_reason = reason
        sim.touch()
        if rollback and sim.source_td:
            self._begin_rollback(sim, f"{reason} Rolling back to {sim.source_td}.", "circuit breaker")
        else:
            sim.status, sim.stopped_at, sim.finished_at = "STOPPED", _now(), _now()

    def _begin_rollback(self, sim: SimDeployment, reason: str, initiator: str) -> None:
        sim.status = "ROLLBACK_IN_PROGRESS"
        sim.status_reason = reason
        sim.rollback = {"reason": f"Rollback initiated by {initiator}.", "startedAt": _now(),
                        "serviceRevisionArn": sim.source_td}
        sim.traffic = 0.0
        sim.enter(sim.stage)
        service = self._service(sim)
        if service is not None and sim.source_td:
            service.task_definition = sim.source_td

    def _advance_rollback(self, sim: SimDeployment) -> None:
        sim.stage_since = time.monotonic()
        sim.status = "ROLLBACK_IN_PROGRESS"
        if sim.old_running < sim.desired:
            sim.old_running += 1
        elif sim.new_running > 0:
            sim.new_running -= 1
        sim.touch()
        if sim.old_running >= sim.desired and sim.new_running == 0:
            sim.status, sim.finished_at = "ROLLBACK_SUCCESSFUL", _now()
            service = self._service(sim)
            if service is not None:
                service.events.insert(0, _event(f"(service {service.name}) rolled back to {sim.source_td}; "
                                                "it has reached a steady state."))

    # ---- views --------------------------------------------------------------------------------------------------
    def _deployments_of(self, key: str) -> list[SimDeployment]:
        return [d for d in self.deployments.values() if d.service_key == key]

    def _serving_deployment(self, key: str) -> SimDeployment | None:
        """Return the newest deployment whose target revision is (or was, before rollback) fully in service."""
        for sim in reversed(self._deployments_of(key)):
            if sim.status == "SUCCESSFUL":
                return sim
            if sim.status in IN_PROGRESS_STATES or sim.status.startswith("ROLLBACK"):
                return None if sim.source_td is None else _SourceView(sim)  # type: ignore[return-value]
        return None

    def _service(self, sim: SimDeployment) -> Any:
        for backend in _ecs_backends():
            if sim.service_key in backend.services:
                return backend.services[sim.service_key]
        return None

    def serving_image(self, cluster: str, service_name: str) -> str | None:
        """Pick the image that answers one request, weighted by the current production traffic split (on the test
        listener, when the request came in there: see LISTENER)."""
        if LISTENER.get() == "test":
            return self.test_image(cluster, service_name)
        with self.lock:
            key = f"{cluster}:{service_name}"
            deployments = self._deployments_of(key)
            if not deployments:
                return self._static_image(key)
            sim = deployments[-1]
            if sim.status == "SUCCESSFUL":
                return sim.target_image
            if sim.status in {"ROLLBACK_SUCCESSFUL"} or (sim.status == "STOPPED" and sim.new_running == 0):
                return sim.source_image
            new_share = sim.traffic / 100.0
            # Until all traffic is on it, a canary's or linear's new task set answers from the alternate target
            # group; from 100 % on, the production target group's metrics are all the new task set's.
            stepped = (sim.strategy in {"CANARY", "LINEAR"} and sim.status in IN_PROGRESS_STATES
                       and sim.traffic < 100.0)
            if random.random() < new_share:
                return ServedImage.of(sim.target_image, new_task_set=stepped)
            return sim.source_image or sim.target_image

    def _static_image(self, key: str) -> str | None:
        for backend in _ecs_backends():
            service = backend.services.get(key)
            if service is not None and service.task_definition:
                return _first_image(backend.describe_task_definition(service.task_definition))
        return None

    def _refresh_service(self, service: Any) -> None:
        """Rewrite the moto service's ``deployments`` list and counts from the simulator's state."""
        key = f"{service.cluster_name}:{service.name}"
        if not service.load_balancers:
            service.load_balancers = self._load_balancers(service)
        config = dict(getattr(service, "deployment_configuration", None) or {})
        if service.load_balancers and not config.get("lifecycleHooks"):
            # As the platform's IaC keeps it on every service behind a load balancer (an update that left it out
            # gets it back): the blue/green test-traffic hook.
            service.deployment_configuration = {**config, "lifecycleHooks": [traffic_test_hook(service.arn)]}
        sims = self._deployments_of(key)
        if not sims:
            # A service created with CreateService: ECS would have started its tasks by now.
            for entry in service.deployments:
                entry.update(runningCount=service.desired_count, pendingCount=0, rolloutState="COMPLETED",
                             rolloutStateReason="ECS deployment completed.")
            service.running_count, service.pending_count = service.desired_count, 0
            return
        sim = sims[-1]
        rollout = {"SUCCESSFUL": "COMPLETED", "ROLLBACK_SUCCESSFUL": "FAILED", "ROLLBACK_IN_PROGRESS": "FAILED",
                   "ROLLBACK_FAILED": "FAILED", "STOPPED": "FAILED" if sim.failed_tasks else "COMPLETED"}
        rollout_state = rollout.get(sim.status, "IN_PROGRESS")
        new_entry = {
            "id": sim.legacy_id, "status": "PRIMARY", "taskDefinition": sim.target_td,
            "desiredCount": sim.desired, "pendingCount": 0 if sim.crashloop is False else 1,
            "runningCount": sim.new_running, "failedTasks": sim.failed_tasks,
            "createdAt": sim.created_at, "updatedAt": sim.updated_at, "launchType": service.launch_type,
            "rolloutState": rollout_state, "rolloutStateReason": sim.status_reason,
        }
        if rollout_state == "COMPLETED":
            new_entry["pendingCount"] = 0
        entries = [new_entry]
        if sim.source_td and sim.old_running > 0:
            entries.append({
                "id": f"{sim.legacy_id}-source", "status": "ACTIVE", "taskDefinition": sim.source_td,
                "desiredCount": sim.desired if sim.status.startswith("ROLLBACK") else 0,
                "pendingCount": 0, "runningCount": sim.old_running, "failedTasks": 0,
                "createdAt": sim.created_at, "updatedAt": sim.updated_at, "launchType": service.launch_type,
                "rolloutState": "COMPLETED", "rolloutStateReason": "Previous service revision.",
            })
            if sim.status.startswith("ROLLBACK"):
                # After a rollback, the source revision is what ECS drives towards: it becomes PRIMARY again.
                entries[0]["status"], entries[1]["status"] = "ACTIVE", "PRIMARY"
                entries.reverse()
        service.deployments = entries
        service.running_count = sim.new_running + sim.old_running
        service.pending_count = 1 if (sim.crashloop and sim.status in IN_PROGRESS_STATES) else 0
        service.current_service_deployment = sim.arn

    def _load_balancers(self, service: Any) -> list[dict[str, Any]]:
        """Return the service's load balancer configuration as ECS native blue/green, canary and linear need it: the
        catalog's target group for production, and its alternate one (:func:`alternate_target_group`)."""
        from omnisphere_release.catalog import load_catalog

        # A service the catalog does not know (tests create their own) has no load balancer.
        entry = next((s for s in load_catalog().services if s.ecs.service == service.name), None)
        if entry is None:
            return []
        region, account = service.arn.split(":")[3:5]
        production = entry.monitoring.target_group
        return [{
            "targetGroupArn": _target_group_arn(region, account, production),
            "containerName": entry.ecs.container, "containerPort": 8080,
            "advancedConfiguration": {
                "alternateTargetGroupArn": _target_group_arn(region, account, alternate_target_group(production)),
                "productionListenerRule": f"arn:aws:elasticloadbalancing:{region}:{account}:listener-rule/app/"
                                          f"omnisphere/0/{entry.name}/production",
                "roleArn": f"arn:aws:iam::{account}:role/ecsInfrastructureRoleForLoadBalancers",
            },
        }]

    # ---- the three service-deployment API actions --------------------------------------------------------------
    def describe_service_deployments(self, response: Any) -> ActionResult:
        self.tick()
        arns = response._get_param("serviceDeploymentArns") or []
        found, failures = [], []
        with self.lock:
            for arn in arns:
                sim = self.deployments.get(arn)
                if sim is None:
                    failures.append({"arn": arn, "reason": "MISSING", "detail": "Service deployment not found."})
                else:
                    found.append(self._full_view(sim))
        return ActionResult({"serviceDeployments": found, "failures": failures})

    def list_service_deployments(self, response: Any) -> ActionResult:
        self.tick()
        cluster = (response._get_param("cluster") or "default").split("/")[-1]
        service = response._get_param("service").split("/")[-1]
        statuses = set(response._get_param("status") or [])
        max_results = int(response._get_param("maxResults") or 20)
        with self.lock:
            sims = [s for s in reversed(self._deployments_of(f"{cluster}:{service}"))
                    if not statuses or s.status in statuses]
            briefs = [{
                "serviceDeploymentArn": s.arn, "serviceArn": s.service_arn, "clusterArn": s.cluster_arn,
                "createdAt": s.created_at, "startedAt": s.created_at, "finishedAt": s.finished_at,
                "targetServiceRevisionArn": s.target_td, "status": s.status, "statusReason": s.status_reason,
            } for s in sims[:max_results]]
        return ActionResult({"serviceDeployments": briefs})

    def stop_service_deployment(self, response: Any) -> ActionResult:
        arn = response._get_param("serviceDeploymentArn")
        stop_type = response._get_param("stopType") or "ABORT"
        with self.lock:
            sim = self.deployments.get(arn)
            if sim is None:
                raise InvalidParameterException(f"Service deployment {arn} not found.")
            if sim.status not in IN_PROGRESS_STATES:
                raise EcsClientException(
                    f"Service deployment {arn} is {sim.status}; only an in-progress deployment can be stopped.")
            if stop_type == "ROLLBACK":
                if not sim.source_td:
                    raise InvalidParameterException("The service has no previous revision to roll back to.")
                sim.status = "ROLLBACK_REQUESTED"
                self._begin_rollback(sim, "Rollback requested by StopServiceDeployment.", "user")
                sim.status = "ROLLBACK_REQUESTED"
            else:
                sim.status = "STOP_REQUESTED"
                sim.touch()
        return ActionResult({"serviceDeploymentArn": arn})

    def _full_view(self, sim: SimDeployment) -> dict[str, Any]:
        target_weight = sim.traffic
        view: dict[str, Any] = {
            "serviceDeploymentArn": sim.arn, "serviceArn": sim.service_arn, "clusterArn": sim.cluster_arn,
            "createdAt": sim.created_at, "startedAt": sim.created_at, "updatedAt": sim.updated_at,
            "status": sim.status, "statusReason": sim.status_reason,
            "lifecycleStage": {"CANARY_BAKE": "BAKE_TIME", "LINEAR_BAKE": "BAKE_TIME"}.get(sim.stage, sim.stage),
            "targetServiceRevision": {
                "arn": sim.target_td, "requestedTaskCount": sim.desired, "runningTaskCount": sim.new_running,
                "pendingTaskCount": 1 if sim.crashloop and sim.status in IN_PROGRESS_STATES else 0,
                "requestedProductionTrafficWeight": target_weight,
            },
            "sourceServiceRevisions": [{
                "arn": sim.source_td, "requestedTaskCount": sim.desired, "runningTaskCount": sim.old_running,
                "pendingTaskCount": 0, "requestedProductionTrafficWeight": 100.0 - target_weight,
            }] if sim.source_td else [],
            "deploymentConfiguration": sim.config or {"strategy": sim.strategy},
            "deploymentCircuitBreaker": {
                "status": "TRIGGERED" if sim.failed_tasks >= sim.breaker_threshold else
                ("MONITORING" if sim.breaker.get("enable") or sim.strategy != "ROLLING" else "DISABLED"),
                "failureCount": sim.failed_tasks, "threshold": sim.breaker_threshold,
            },
        }
        if sim.finished_at:
            view["finishedAt"] = sim.finished_at
        if sim.stopped_at:
            view["stoppedAt"] = sim.stopped_at
        if sim.rollback:
            view["rollback"] = sim.rollback
        return view


class _SourceView:
    """The part of an unfinished deployment that is still in service: its source revision."""

    def __init__(self, sim: SimDeployment) -> None:
        self.target_td = sim.source_td
        self.target_image = sim.source_image


def _first_image(task_definition: Any) -> str:
    containers = task_definition.container_definitions or []
    return containers[0].get("image", "") if containers else ""


def _event(message: str) -> dict[str, Any]:
    return {"id": f"{mock_random.uuid4()}", "createdAt": _now(), "message": message}


def _ecs_backends() -> list[Any]:
    backends = []
    for account in ecs_models.ecs_backends.values():
        for backend in account.values():
            backends.append(backend)
    return backends
