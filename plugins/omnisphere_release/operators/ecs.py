"""ecs_deploy and rollback_ecs: move the service to the new image, and back to the revision preflight recorded."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import load_catalog
from omnisphere_release.hooks.ecs import (IN_FLIGHT, EcsDeploymentError, EcsDeploymentHook, deployment_configuration,
                                          summarize)
from omnisphere_release.operators.common import PREFLIGHT, stage_output
from omnisphere_release.triggers.ecs import EcsServiceDeploymentTrigger


class EcsDeployServiceOperator(BaseOperator):
    """Register a revision that differs from the current one only by the image, update the service with the chosen
    strategy, and wait (deferred, no worker slot held) until the deployment completes, fails or times out.

    The revision is tagged with the run, so a retry finds the deployment its first try started and waits for it
    again instead of starting a second one. For blue_green, canary and linear the task ends when the new revision
    takes all production traffic: the bake that follows is the monitoring gate's, and rollback_ecs can still stop
    the deployment with ROLLBACK, which ECS does at once.
    """

    template_fields = ("service", "strategy", "bake_minutes")

    def __init__(self, *, service: str, strategy: str, bake_minutes: Any, poll_seconds: float = 3.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.strategy = strategy
        self.bake_minutes = bake_minutes
        self.poll_seconds = poll_seconds

    def execute(self, context: Any) -> None:
        service = load_catalog().get(self.service)
        before = stage_output(context, PREFLIGHT)
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
                    current = ecs.describe_task_definition(before["previous_task_definition"])
                    revision = ecs.register_revision(current, service.ecs.container, before["target_image"], run_tag)
                    self.log.info("Registered %s: same as %s except the image %s.", revision,
                                  before["previous_task_definition"], before["target_image"])
                arn = ecs.update_service(service.ecs.cluster, service.ecs.service, revision, configuration)
                self.log.info("Started a %s deployment of %s to %s: %s (timeout %d min).", configuration["strategy"],
                              service.ecs.service, revision, arn, service.deploy.timeout_minutes)
        except EcsDeploymentError as exc:
            raise AirflowException(f"ECS deploy of {service.name} could not start: {exc}") from None
        context["ti"].xcom_push(key="deployment", value={"deployment_arn": arn, "task_definition": revision,
                                                         "configuration": configuration})
        self.defer(
            trigger=EcsServiceDeploymentTrigger(
                deployment_arn=arn, deadline=time.time() + service.deploy.timeout_minutes * 60,
                aws_conn_id=service.aws_conn_id, done_on_traffic_shift=self.strategy != "rolling",
                poll_seconds=self.poll_seconds),
            method_name="execute_complete",
            timeout=timedelta(minutes=service.deploy.timeout_minutes + 5),
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        deployment = context["ti"].xcom_pull(task_ids=self.task_id, key="deployment") or {}
        status = event.get("status")
        if status == "success":
            self.log.info("Deployment %s reached %s: %s. Next: smoke_test.", event["deployment_arn"],
                          event.get("deployment_status"), event.get("summary"))
            return {**deployment, "deployment_status": event.get("deployment_status"), "summary": event.get("summary")}
        if status == "timeout":
            raise AirflowFailException(f"ECS deployment {event['deployment_arn']} did not finish within the "
                                       f"catalog's deploy.timeout_minutes; last state: {event.get('summary')}. "
                                       f"Next: rollback_ecs stops it with ROLLBACK.")
        raise AirflowFailException(f"ECS deployment {event.get('deployment_arn')} failed: "
                                   f"{event.get('summary') or event.get('message')} {event.get('reason', '')}. "
                                   f"Next: rollback_ecs makes sure the service is back on its previous revision.")


class EcsRollbackServiceOperator(BaseOperator):
    """rollback_ecs: bring the service back to the task definition preflight recorded, and wait until it is stable.

    Stops an in-flight deployment with ROLLBACK, or deploys the previous revision again if the new one completed;
    when ECS already rolled back (circuit breaker), it only waits and checks. Running it twice changes nothing.
    """

    template_fields = ("service",)
    ui_color = "#f8e0d8"

    def __init__(self, *, service: str, poll_seconds: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.poll_seconds = poll_seconds

    def execute(self, context: Any) -> dict[str, Any]:
        service = load_catalog().get(self.service)
        before = stage_output(context, PREFLIGHT)
        if not before:
            self.log.info("Nothing to roll back on ECS: preflight recorded no state, so this run changed nothing.")
            return {"action": "none"}
        previous = before["previous_task_definition"]
        ecs = EcsDeploymentHook(service.aws_conn_id)
        timeout = service.deploy.timeout_minutes * 60
        try:
            live = ecs.describe_service(service.ecs.cluster, service.ecs.service)
            action = "none"
            arn = live.get("currentServiceDeployment")
            deployment = ecs.describe_deployment(arn) if arn else None
            if deployment and deployment["status"] in IN_FLIGHT and not deployment["status"].startswith("ROLLBACK") \
                    and deployment.get("targetServiceRevision", {}).get("arn") != previous:
                self.log.info("Stopping in-flight deployment %s with ROLLBACK (%s).", arn, summarize(deployment))
                ecs.stop_with_rollback(arn)
                action = "stopped in-flight deployment with ROLLBACK"
            elif live["taskDefinition"] != previous:
                self.log.info("Service runs %s; deploying the previous revision %s again.", live["taskDefinition"],
                              previous)
                arn = ecs.update_service(service.ecs.cluster, service.ecs.service, previous,
                                         deployment_configuration("rolling", 0))
                action = f"redeployed {previous}"
            if arn:
                settled = ecs.wait_until_settled(arn, timeout, self.poll_seconds)
                self.log.info("Deployment %s settled: %s", arn, summarize(settled))
            live = ecs.describe_service(service.ecs.cluster, service.ecs.service)
        except EcsDeploymentError as exc:
            raise AirflowFailException(f"ECS rollback of {service.name} failed: {exc}. The service may still run the "
                                       f"new image: the schema is left as is. Page the service owner.") from None
        if live["taskDefinition"] != previous:
            raise AirflowFailException(f"ECS rollback of {service.name} ended on {live['taskDefinition']}, not the "
                                       f"previous {previous}. Page the service owner.")
        self.log.info("%s is back on %s (%s). Next: rollback_schema.", service.name, previous,
                      action if action != "none" else "ECS had already rolled back, or nothing was deployed")
        return {"action": action, "task_definition": previous}
