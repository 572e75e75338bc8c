"""ecs_deploy and rollback_ecs: move the service to the new image, and back to the revision preflight recorded."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, cast

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import Service, load_catalog
from omnisphere_release.contracts import DeploymentOutput, ReleasePlan, ReleaseRun
from omnisphere_release.hooks.ecs import (
    EcsDeploymentError,
    EcsDeploymentHook,
    EcsNotOnTarget,
    ReturnResult,
    deployment_configuration,
    pinned_image,
    summarize,
)
from omnisphere_release.logs import Log
from omnisphere_release.operators.common import ServiceStageOperator
from omnisphere_release.triggers.ecs import EcsServiceDeploymentTrigger


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
    """

    template_fields = ("service", "strategy", "bake_minutes")

    def __init__(self, *, service: str, strategy: str, bake_minutes: Any, poll_seconds: float = 3.0,
                 **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        self.strategy = strategy
        self.bake_minutes = bake_minutes
        self.poll_seconds = poll_seconds

    def execute(self, context: Context) -> None:
        service = load_catalog().get(self.service)
        before = ReleaseRun(context).plan
        assert before is not None, "ecs_deploy runs only after preflight succeeded"
        ecs = EcsDeploymentHook(service.aws_conn_id)
        run_tag = f"{self.dag_id}/{context['run_id']}"
        family = before["previous_task_definition"].rsplit("/", 1)[-1].split(":")[0]
        configuration = deployment_configuration(self.strategy, float(self.bake_minutes))
        try:
            revision = ecs.find_revision_of_run(family, run_tag)
            live = ecs.describe_service(service.ecs.cluster, service.ecs.service)
            if revision and live["taskDefinition"] == revision and live.get("currentServiceDeployment"):
                arn = live["currentServiceDeployment"]
                self.log.info("Reattaching to deployment %s that an earlier try of this run started (revision %s).",
                              arn, revision)
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
        started: DeploymentOutput = {"deployment_arn": arn, "task_definition": revision,
                                     "configuration": configuration}
        context["ti"].xcom_push(key="deployment", value=started)
        self.defer(
            trigger=EcsServiceDeploymentTrigger(
                deployment_arn=arn, deadline=time.time() + service.deploy.timeout_minutes * 60,
                aws_conn_id=service.aws_conn_id, done_on_traffic_shift=self.strategy != "rolling",
                poll_seconds=self.poll_seconds),
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
            self.log.info("Deployment %s reached %s: %s. Next: smoke_test.", event["deployment_arn"],
                          event.get("deployment_status"), event.get("summary"))
            return {**deployment, "deployment_status": str(event.get("deployment_status")),
                    "summary": str(event.get("summary"))}
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


class EcsRollbackServiceOperator(ServiceStageOperator):
    """rollback_ecs: bring the service back to the task definition preflight recorded, and wait until it is stable.

    Stops an in-flight deployment with ROLLBACK, or deploys the previous revision again if the new one completed;
    when ECS already rolled back (circuit breaker), it only waits and checks. Running it twice changes nothing.
    """

    ui_color = "#f8e0d8"

    def __init__(self, *, service: str, poll_seconds: float = 2.0, **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        self.poll_seconds = poll_seconds

    def execute(self, context: Context) -> dict[str, Any]:
        plan = ReleaseRun(context).plan
        if not plan:
            self.log.info("Nothing to roll back on ECS: preflight recorded no state, so this run changed nothing.")
            return {"action": "none"}
        service = load_catalog().get(self.service)
        result = return_service_to(service, plan["previous_task_definition"], self.log, self.poll_seconds)
        self.log.info("%s is back on %s (%s). Next: rollback_schema.", service.name, result.task_definition,
                      result.action if result.action != "none" else
                      "ECS had already rolled back, or nothing was deployed")
        return {"action": result.action, "task_definition": result.task_definition}


def return_service_to(service: Service, task_definition: str, log: Log, poll_seconds: float = 2.0) -> ReturnResult:
    """Bring ``service`` to ``task_definition`` and wait: the one ECS way back, of rollback_ecs and rollback_<service>.

    An AWS error is retried by Airflow (it says nothing about the service); ending on another revision is final.
    """
    log.info("Bringing %s back to %s (stopping an in-flight deployment with ROLLBACK, or deploying it again), then "
             "waiting up to %d min for ECS to settle.", service.name, task_definition, service.deploy.timeout_minutes)
    try:
        result = EcsDeploymentHook(service.aws_conn_id).return_to(
            service.ecs.cluster, service.ecs.service, task_definition, service.deploy.timeout_minutes * 60,
            poll_seconds)
    except EcsNotOnTarget as exc:
        raise AirflowFailException(f"ECS rollback of {service.name} failed: {exc}. The schema is left as is. Page "
                                   f"the service owner.") from None
    except EcsDeploymentError as exc:
        raise AirflowException(f"ECS rollback of {service.name} could not finish: {exc}. Retrying if retries "
                               f"remain; the service may still run the new image.") from None
    if result.settled:
        log.info("Deployment settled: %s", summarize(result.settled))
    return result
