"""ecs_deploy and rollback_ecs: move the service to the new image, and back to the revision preflight recorded."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any, TypedDict, cast

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import Service, load_catalog
from omnisphere_release.contracts import DeploymentOutput, ReleasePlan, ReleaseRun
from omnisphere_release.hooks.ecs import (
    STEPPED,
    TEST_TRAFFIC_STAGE,
    EcsDeploymentError,
    EcsDeploymentHook,
    EcsNotOnTarget,
    deployment_configuration,
    lifecycle_hooks,
    parse_steps,
    pinned_image,
    steps_of,
    steps_problem,
    traffic_hook_prefix,
)
from omnisphere_release.operators.common import ServiceStageOperator
from omnisphere_release.triggers.ecs import EcsServiceDeploymentTrigger


def run_tag_of(dag_id: str, run_id: str) -> str:
    """The tag ecs_deploy puts on the revision it registers: how a retry, and the rollback, know this run's own."""
    return f"{dag_id}/{run_id}"


def family_of(task_definition_arn: str) -> str:
    return task_definition_arn.rsplit("/", 1)[-1].split(":")[0]


class EcsDeployServiceOperator(ServiceStageOperator):
    """Register a revision that differs from the current one only by the image, update the service with the chosen
    strategy, and wait (deferred, no worker slot held) until the deployment completes, fails or times out.

    The image is named by the digest preflight recorded (``<repository>@sha256:...``), so the release deploys the
    image that was checked even if its tag is pushed again in between; only an image preflight could not check
    (outside ECR, no digest) is deployed by its tag.

    The revision is tagged with the run, so a retry finds the deployment its first try started and waits for it
    again instead of starting a second one. For blue_green, canary and linear the task ends when the new revision
    takes all production traffic: the bake that follows is the monitoring gate's, and rollback_ecs can still stop
    the deployment with ROLLBACK, which ECS does at once.

    Canary and linear run in steps (the run's ``steps``, else the catalog's ``deploy.steps``; none: the fixed
    shapes of :func:`deployment_configuration`): ECS's own CANARY or LINEAR, and the task ends as soon as the first
    step's share of traffic is on the new revision, for the monitoring gate to watch each step while ECS bakes it.

    Blue/green keeps the service's lifecycle hooks; with the platform's test-traffic hook (see
    hooks.ecs.traffic_hook_prefix) the task ends when ECS holds green on the test listener, for smoke_test to
    test it there and answer the hook before any production traffic moves.
    """

    template_fields = ("service", "environment", "strategy", "bake_minutes", "steps")

    def __init__(self, *, service: str, strategy: str, bake_minutes: Any, steps: Any = None,
                 poll_seconds: float = 3.0, **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        self.strategy = strategy
        self.bake_minutes = bake_minutes
        self.steps = steps
        self.poll_seconds = poll_seconds

    def _configuration(self, service: Service) -> tuple[dict[str, Any], bool]:
        """Return ECS's deploymentConfiguration for this run: its strategy, bake and steps (the run's, or the
        catalog's); steps ECS cannot run fail the task before anything changed."""
        try:
            steps = parse_steps(self.steps, "the run's steps param")
        except ValueError as exc:
            raise AirflowFailException(f"ECS deploy of {service.name}: {exc}. Nothing was deployed.") from None
        where = "the run's steps param"
        if not steps and self.strategy in STEPPED:
            steps = [step.model_dump() for step in service.deploy.steps]
            where = f"the catalog's deploy.steps of {service.name}"
        if steps and self.strategy not in STEPPED:
            self.log.info("Ignoring %s (%s): %s deploys in one switch.", where, steps, self.strategy)
            steps = []
        if steps and (problem := steps_problem(self.strategy, steps)):
            raise AirflowFailException(f"ECS deploy of {service.name}: {where}: {problem}. Nothing was deployed; "
                                       f"fix the steps and release again.")
        configuration = deployment_configuration(self.strategy, float(self.bake_minutes), steps)
        if steps:
            self.log.info("%s steps from %s: %s (ECS %s).", self.strategy.capitalize(), where,
                          " -> ".join(f"{s['percent']:g} % for {s['bake_minutes']:g} min" for s in
                                      steps_of(configuration)), configuration)
        return configuration, bool(steps)

    def execute(self, context: Context) -> None:
        service = load_catalog().get(self.service, self.environment)
        before = ReleaseRun(context).plan
        assert before is not None, "ecs_deploy runs only after preflight succeeded"
        ecs = EcsDeploymentHook(service.aws_conn_id)
        run_tag = run_tag_of(self.dag_id, context["run_id"])
        family = family_of(before["previous_task_definition"])
        configuration, stepped = self._configuration(service)
        try:
            revision = ecs.find_revision_of_run(family, run_tag)
            live = ecs.describe_service(service.ecs.cluster, service.ecs.service)
            # Blue/green: the service's lifecycle hooks (the platform's IaC sets them) go with the update; with the
            # platform's test-traffic hook, ECS holds green on the test listener until smoke_test answers it.
            hook_prefix = None
            if self.strategy == "blue_green" and (hooks := lifecycle_hooks(live)):
                configuration = {**configuration, "lifecycleHooks": hooks}
                hook_prefix = traffic_hook_prefix(hooks)
            timeout = service.deploy.timeout_minutes * 60
            deadline = time.time() + timeout
            if revision and live["taskDefinition"] == revision and live.get("currentServiceDeployment"):
                arn = live["currentServiceDeployment"]
                # The deadline counts from when the deployment started, so a retry does not extend it.
                started_at = ecs.describe_deployment(arn).get("startedAt")
                if isinstance(started_at, datetime):
                    deadline = min(deadline, started_at.timestamp() + timeout)
                self.log.info("Reattaching to deployment %s that an earlier try of this run started (revision %s); "
                              "deadline in %.0fs.", arn, revision, deadline - time.time())
            else:
                if not revision:
                    image = self._image_to_deploy(before)
                    current = ecs.describe_task_definition(before["previous_task_definition"])
                    revision = ecs.register_revision(current, service.ecs.container, image, run_tag)
                    self.log.info("Registered %s: same as %s except the image %s.", revision,
                                  before["previous_task_definition"], image)
                arn = ecs.update_service(service.ecs.cluster, service.ecs.service, revision, configuration)
                self.log.info("Started a %s deployment of %s to %s: %s (timeout %d min).", configuration["strategy"],
                              service.ecs.service, revision, arn, service.deploy.timeout_minutes)
        except EcsDeploymentError as exc:
            raise AirflowException(f"ECS deploy of {service.name} could not start: {exc}") from None
        # "steps": the traffic steps the monitoring gate watches one by one (none: it bakes once at 100 %);
        # "test_traffic_hook": the SSM parameter smoke_test answers ECS's test-traffic hook in (blue/green).
        hook_parameter = f"{hook_prefix}/{arn.rsplit('/', 1)[-1]}" if hook_prefix else None
        started = cast("DeploymentOutput", {"deployment_arn": arn, "task_definition": revision,
                                            "configuration": configuration,
                                            "steps": steps_of(configuration) if stepped else [],
                                            "test_traffic_hook": hook_parameter})
        if hook_parameter:
            self.log.info("ECS holds green at %s until smoke_test answers its lifecycle hook (SSM %s): the smoke "
                          "tests run on the test listener before any production traffic moves.", TEST_TRAFFIC_STAGE,
                          hook_parameter)
        context["ti"].xcom_push(key="deployment", value=started)
        self.defer(
            trigger=EcsServiceDeploymentTrigger(
                deployment_arn=arn, deadline=deadline,
                aws_conn_id=service.aws_conn_id, done_on_traffic_shift=self.strategy != "rolling",
                poll_seconds=self.poll_seconds,
                done_at_percent=steps_of(configuration)[0]["percent"] if stepped else None,
                done_at_stage=TEST_TRAFFIC_STAGE if hook_parameter else None),
            method_name="execute_complete",
            timeout=timedelta(minutes=service.deploy.timeout_minutes + 5),
        )

    def _image_to_deploy(self, before: ReleasePlan) -> str:
        """Return the image preflight checked, by the digest the registry gave it then: a tag pushed again since then
        (a CI re-run, a hotfix under the same tag) must not change what this release deploys."""
        digest = before["target_image_digest"]
        image = pinned_image(before["target_image"], digest)
        if digest:
            self.log.info("Deploying %s by digest %s: the image the tag named when preflight checked it (a push "
                          "of the tag since then changes nothing this release deploys).", before["target_image"],
                          digest)
        else:
            self.log.warning("Deploying %s by its tag, pinned by no digest: its registry is not ECR, so preflight "
                             "could not check it; ECS starts whatever the tag points at when each task starts.",
                             image)
        return image

    def execute_complete(self, context: Context, event: dict[str, Any]) -> DeploymentOutput:
        deployment = cast("DeploymentOutput", context["ti"].xcom_pull(task_ids=self.task_id, key="deployment") or {})
        status = event.get("status")
        if status == "success":
            stepped = bool(deployment.get("steps"))
            self.log.info("Deployment %s reached %s: %s. Next: smoke_test%s.", event["deployment_arn"],
                          event.get("deployment_status"), event.get("summary"),
                          ", then monitoring_gate watches each traffic step" if stepped else "")
            output: DeploymentOutput = {**deployment, "deployment_status": str(event.get("deployment_status")),
                                        "summary": str(event.get("summary"))}
            if stepped:
                # ECS's first step bakes from just after the trigger's last read without it: monitoring_gate
                # analyses it from there, not from its own start after smoke_test and regression_test.
                output["first_share_after"] = float(event.get("after") or time.time())
            return output
        if status == "timeout":
            raise AirflowFailException(f"ECS deployment {event['deployment_arn']} did not finish within the "
                                       f"catalog's deploy.timeout_minutes; last state: {event.get('summary')}. "
                                       f"Next: rollback_ecs stops it with ROLLBACK.")
        if status == "error":  # the trigger could not read the deployment: say so, and let a retry reattach to it
            raise AirflowException(f"Could not follow ECS deployment {event.get('deployment_arn')}: "
                                   f"{event.get('message')}. Retrying if retries remain (a retry reattaches to this "
                                   f"deployment); otherwise rollback_ecs brings the service back.")
        raise AirflowFailException(f"ECS deployment {event.get('deployment_arn')} failed: "
                                   f"{event.get('summary') or event.get('message')} {event.get('reason', '')}. "
                                   f"Next: rollback_ecs makes sure the service is back on its previous revision.")


WAY_BACK = "way_back"


class WayBack(TypedDict):
    """Where a way back stands between its steps: its target, what it did so far, and its absolute deadline."""

    task_definition: str
    actions: list[str]
    deadline: float


class EcsReturnServiceOperator(ServiceStageOperator):
    """A stage that brings a service back to a task definition: the one ECS way back, of rollback_ecs and of
    rollback_<service>'s ECS step, deferred.

    Each step is :meth:`EcsDeploymentHook.return_to` (stop an in-flight deployment with ROLLBACK, or deploy the
    target again, or nothing); while ECS works, the task defers to EcsServiceDeploymentTrigger until that deployment
    leaves flight, holding no worker slot, then takes the next step, until the service runs the target with nothing
    in flight. The deadline (the catalog's deploy.timeout_minutes, twice: a stop, then a redeploy) is absolute and
    carried across the deferrals. An AWS error, or a deadline that passed, lets Airflow retry (the retry looks at the
    service again and goes on from there); ending on another revision is final.
    """

    ui_color = "#f8e0d8"
    next_step = ""  # what the log says comes after, once the service is back

    def __init__(self, *, service: str, poll_seconds: float = 2.0, **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        self.poll_seconds = poll_seconds

    def return_service_to(self, context: Context, service: Service, task_definition: str,
                          actions: list[str] | None = None, deadline: float | None = None) -> dict[str, Any]:
        """Take the next step back to ``task_definition``; defer while ECS works; return the outcome when there."""
        if deadline is None:
            deadline = time.time() + 2 * service.deploy.timeout_minutes * 60
            self.log.info("Bringing %s back to %s (stopping an in-flight deployment with ROLLBACK, or deploying it "
                          "again), then waiting, deferred, up to %d min for ECS to settle.", service.name,
                          task_definition, 2 * service.deploy.timeout_minutes)
        actions = list(actions or [])
        try:
            step = EcsDeploymentHook(service.aws_conn_id).return_to(
                service.ecs.cluster, service.ecs.service, task_definition,
                redeployed=any(a.startswith("redeployed") for a in actions))
        except EcsNotOnTarget as exc:
            raise AirflowFailException(f"ECS rollback of {service.name} failed: {exc}. The schema is left as is. Page "
                                       f"the service owner.") from None
        except EcsDeploymentError as exc:
            raise AirflowException(f"ECS rollback of {service.name} could not finish: {exc}. Retrying if retries "
                                   f"remain; the service may still run the new image.") from None
        if step.action:
            actions.append(step.action)
            self.log.info("%s: %s.", service.name, step.action)
        if step.wait_for is None:
            action = " and ".join(actions) or "none"
            self.log.info("%s runs %s with nothing in flight (%s).%s", service.name, task_definition,
                          action if actions else "ECS had already rolled back, or nothing was deployed",
                          f" {self.next_step}" if self.next_step else "")
            return {"action": action, "task_definition": task_definition}
        if time.time() >= deadline:
            raise AirflowException(f"ECS rollback of {service.name} could not finish: deployment {step.wait_for} "
                                   f"is still in flight at the deadline. Retrying if retries remain; the service may "
                                   f"still run the new image.")
        self.log.info("Waiting, deferred, for deployment %s to settle (deadline in %.0fs).", step.wait_for,
                      deadline - time.time())
        # Where the way back stands, for the next step (pushed like ecs_deploy's deployment: kept across deferrals).
        way_back: WayBack = {"task_definition": task_definition, "actions": actions, "deadline": deadline}
        context["ti"].xcom_push(key=WAY_BACK, value=way_back)
        self.defer(
            trigger=EcsServiceDeploymentTrigger(deployment_arn=step.wait_for, deadline=deadline,
                                                aws_conn_id=service.aws_conn_id, poll_seconds=self.poll_seconds,
                                                settle=True),
            method_name="resume_return",
            timeout=timedelta(seconds=max(60.0, deadline - time.time() + 300)),
        )

    def resume_return(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Go on after the trigger: a settled deployment leads to the next step; anything else is retryable."""
        service = load_catalog().get(self.service, self.environment)
        if event.get("status") == "settled":
            self.log.info("Deployment settled: %s", event.get("summary"))
            way_back = cast("WayBack", context["ti"].xcom_pull(task_ids=self.task_id, key=WAY_BACK))
            return self.return_service_to(context, service, way_back["task_definition"], way_back["actions"],
                                          way_back["deadline"])
        raise AirflowException(f"ECS rollback of {service.name} could not finish: deployment "
                               f"{event.get('deployment_arn')} {event.get('status')}: "
                               f"{event.get('summary') or event.get('message')}. Retrying if retries remain (the "
                               f"retry looks at the service again); the service may still run the new image.")


class EcsRollbackServiceOperator(EcsReturnServiceOperator):
    """rollback_ecs: bring the service back to the task definition preflight recorded, and wait until it is stable.

    Stops an in-flight deployment with ROLLBACK, or deploys the previous revision again if the new one completed;
    when ECS already rolled back (circuit breaker), it only waits and checks. Running it twice changes nothing.
    """

    next_step = "Next: rollback_schema."

    def execute(self, context: Context) -> dict[str, Any]:
        plan = ReleaseRun(context).plan
        if not plan:
            self.log.info("Nothing to roll back on ECS: preflight recorded no state, so this run changed nothing.")
            return {"action": "none"}
        service = load_catalog().get(self.service, self.environment)
        # Only what this run deployed is undone: a run refused when approved, after a hotfix went first while it
        # waited, must leave the hotfix running. ecs_deploy registers its revision (tagged with the run) before it
        # updates the service, so a run without one deployed nothing, even if its worker died mid-deploy.
        try:
            mine = EcsDeploymentHook(service.aws_conn_id).find_revision_of_run(
                family_of(plan["previous_task_definition"]), run_tag_of(self.dag_id, context["run_id"]))
        except EcsDeploymentError as exc:
            raise AirflowException(f"ECS rollback of {service.name}: cannot tell whether this run deployed anything: "
                                   f"{exc}. Retrying if retries remain.") from None
        if mine is None:
            self.log.info("Nothing to roll back on ECS: this run registered no revision of %s, so it deployed nothing "
                          "(what the service runs now is not this run's to undo). %s", service.name, self.next_step)
            return {"action": "none", "deployed": False}
        return self.return_service_to(context, service, plan["previous_task_definition"])
