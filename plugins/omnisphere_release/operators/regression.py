"""regression_test: run the service's regression suite against the new version, as a one-off ECS task.

The suite is the task definition the catalog names (``regression.task_definition``), started with the amazon
provider's ``EcsRunTaskOperator`` in the run's environment's cluster, with the service's launch type and network
configuration (so that it reaches the service as its peers do), and waited for deferred. Its container is told what
to test through environment overrides:

- ``OMNI_RELEASE_IMAGE``: the released image, by the digest preflight checked (``<repository>@sha256:...``), or by its
  tag when preflight could not pin it; ``OMNI_RELEASE_IMAGE_TAG`` and ``OMNI_RELEASE_IMAGE_DIGEST`` apart;
- ``OMNI_SERVICE_URL``: the service's URL (its HTTP connection, as smoke_test probes it);
- ``OMNI_SERVICE``, ``OMNI_ENVIRONMENT``.

The suite's output is read where its task definition sends it (the container's ``awslogs`` log configuration): the
trigger (:class:`EcsTaskStoppedTrigger`) forwards its lines into this task's log while it runs, and a failure quotes
the last of them. A non-zero exit code fails the stage for good (no retry: the same suite against the same image fails
again) and the release rolls back; so does a suite still running at the catalog's ``regression.timeout_minutes``, which
is stopped. A retry after a lost worker reattaches to the suite this run started instead of starting a second one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any, TypedDict

from airflow.providers.amazon.aws.hooks.ecs import EcsHook
from airflow.providers.amazon.aws.hooks.logs import AwsLogsHook
from airflow.providers.amazon.aws.operators.ecs import EcsRunTaskOperator
from airflow.providers.amazon.aws.triggers.ecs import TaskDoneTrigger
from airflow.providers.amazon.aws.utils import validate_execute_complete_event
from airflow.providers.amazon.aws.utils.task_log_fetcher import AwsTaskLogFetcher
from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferralError
from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async
from botocore.exceptions import BotoCoreError, ClientError

from omnisphere_release.catalog import RegressionSuite, Service, load_catalog
from omnisphere_release.contracts import ReleaseRun
from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsDeploymentHook, pinned_image
from omnisphere_release.hooks.http import SmokeTestHook

# What the suite's container is told; a suite image reads these names.
IMAGE_UNDER_TEST = "OMNI_RELEASE_IMAGE"
IMAGE_TAG = "OMNI_RELEASE_IMAGE_TAG"
IMAGE_DIGEST = "OMNI_RELEASE_IMAGE_DIGEST"
SERVICE_URL = "OMNI_SERVICE_URL"
LAST_LINES = 20  # of the suite's output, quoted in a failure


class RegressionOutcome(TypedDict, total=False):
    """regression_test: the suite's run, or why there was none."""

    suite: str | None  # the task definition run; None: the service has no suite in the catalog
    task_arn: str
    cluster: str
    image: str
    exit_code: int
    seconds: float | None
    summary: str  # the suite's last line


class EcsTaskStoppedTrigger(TaskDoneTrigger):
    """Wait for a one-off ECS task to stop, forwarding its CloudWatch log lines into the task's log as they come.

    The provider's TaskDoneTrigger does the same through aiobotocore, which this project does not install (it would
    move the pins of botocore and boto3): this one calls botocore in a thread, as the project's other triggers do,
    with the same arguments. A read that fails is tried again at the next poll; after ``waiter_max_attempts`` polls
    it fires ``timeout`` instead of raising, so that the operator stops the task and says why.
    """

    async def run(self) -> AsyncIterator[TriggerEvent]:
        ecs = await sync_to_async(self._client)(EcsHook, self.region_name)
        logs = await sync_to_async(self._client)(AwsLogsHook, self.log_region_name or self.region_name)
        token: str | None = None
        last_status = ""
        for _ in range(max(1, self.waiter_max_attempts)):
            try:
                described = await asyncio.to_thread(ecs.describe_tasks, cluster=self.cluster, tasks=[self.task_arn])
            except (BotoCoreError, ClientError) as exc:
                self.log.warning("Cannot read task %s: %s; trying again in %ss.", self.task_arn, exc, self.waiter_delay)
                described = {"tasks": [{"lastStatus": last_status}]}
            if self.log_group and self.log_stream:
                token = await asyncio.to_thread(self._forward_logs_since, logs, token)
            if not described.get("tasks"):
                yield TriggerEvent({"status": "error", "task_arn": self.task_arn, "cluster": self.cluster,
                                    "message": f"ECS does not know task {self.task_arn}: {described.get('failures')}"})
                return
            status = str(described["tasks"][0].get("lastStatus") or "")
            if status == "STOPPED":
                yield TriggerEvent({"status": "success", "task_arn": self.task_arn, "cluster": self.cluster,
                                    "log_group": self.log_group, "log_stream": self.log_stream,
                                    "log_region": self.log_region_name or self.region_name})
                return
            if status != last_status:
                self.log.info("Task %s is %s.", self.task_arn.rsplit("/", 1)[-1], status)
                last_status = status
            await asyncio.sleep(self.waiter_delay)
        yield TriggerEvent({"status": "timeout", "task_arn": self.task_arn, "cluster": self.cluster,
                            "message": f"still {last_status or 'unknown'} after {self.waiter_max_attempts} polls "
                                       f"{self.waiter_delay}s apart"})

    def _client(self, hook_class: Any, region_name: str | None) -> Any:
        return hook_class(aws_conn_id=self.aws_conn_id, region_name=region_name, verify=self.verify,
                          config=self.botocore_config).conn

    def _forward_logs_since(self, logs: Any, token: str | None) -> str | None:
        """Log every line written to the stream since ``token``; return the token to go on from."""
        while True:
            try:
                response = logs.get_log_events(logGroupName=self.log_group, logStreamName=self.log_stream,
                                               startFromHead=True, **({"nextToken": token} if token else {}))
            except (BotoCoreError, ClientError) as exc:  # read again at the next poll, from the same token
                code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
                if code != "ResourceNotFoundException":  # that one: the suite has not written yet
                    self.log.warning("Cannot read log stream %s of %s: %s", self.log_stream, self.log_group, exc)
                return token
            for event in response["events"]:
                self.log.info("%s", AwsTaskLogFetcher.event_to_str(event))
            if not response["events"] or response["nextForwardToken"] == token:
                return str(response["nextForwardToken"])
            token = response["nextForwardToken"]


class EcsRegressionTestOperator(EcsRunTaskOperator):
    """Run ``service``'s regression suite (catalog ``regression``) against the image preflight checked; fail the
    stage on a non-zero exit code. A service without a suite passes, saying so."""

    template_fields = (*EcsRunTaskOperator.template_fields, "service", "environment")

    def __init__(self, *, service: str, environment: str = "", waiter_delay: int = 5, **kwargs: Any) -> None:
        # Everything ECS needs comes from the catalog in the run's environment, once templates are rendered.
        super().__init__(task_definition="", cluster="", overrides={}, deferrable=True, reattach=True,
                         waiter_delay=waiter_delay, number_logs_exception=LAST_LINES, **kwargs)
        self.service = service
        self.environment = environment
        self.suite_log_stream: str | None = None  # the stream of the suite this task ran

    # ---- the catalog's suite, in this run's environment ------------------------------------------------------
    def _resolve(self) -> tuple[Service, RegressionSuite | None]:
        """Point the provider's operator at the suite: connection, cluster, task definition, container, time limit."""
        service = load_catalog().get(self.service, self.environment)
        suite = service.regression
        if suite is not None:
            self.aws_conn_id = service.aws_conn_id
            self.cluster, self.task_definition = service.ecs.cluster, suite.task_definition
            self.container_name = suite.container
            # The trigger polls every waiter_delay seconds: that many polls make the catalog's time limit.
            self.waiter_max_attempts = max(1, math.ceil(suite.timeout_minutes * 60 / self.waiter_delay))
        return service, suite

    def _read_log_configuration(self, service: Service, suite: RegressionSuite) -> None:
        """Read where the suite's output goes from its container's log configuration (the awslogs driver)."""
        try:
            definition = self.client.describe_task_definition(taskDefinition=suite.task_definition)["taskDefinition"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ClientException":  # ECS's answer for an unknown one
                raise AirflowFailException(
                    f"Regression suite of {service.name}: ECS has no task definition {suite.task_definition!r} "
                    f"({exc}). Register it, or fix the catalog field regression.task_definition of {service.name}; "
                    f"nothing was started.") from None
            raise AirflowException(f"Regression suite of {service.name}: cannot read task definition "
                                   f"{suite.task_definition}: {exc}. Retrying if retries remain.") from None
        except BotoCoreError as exc:
            raise AirflowException(f"Regression suite of {service.name}: cannot read task definition "
                                   f"{suite.task_definition}: {exc}. Retrying if retries remain.") from None
        containers = definition.get("containerDefinitions", [])
        container = next((c for c in containers if c.get("name") == suite.container), None)
        if container is None:
            raise AirflowFailException(f"Regression suite of {service.name}: task definition {suite.task_definition} "
                                       f"has no container {suite.container!r} (it has "
                                       f"{[c.get('name') for c in containers]}); fix the catalog field "
                                       f"regression.container of {service.name}.")
        logging = container.get("logConfiguration") or {}
        options = logging.get("options") or {}
        if logging.get("logDriver") == "awslogs" and options.get("awslogs-stream-prefix"):
            self.awslogs_group = options.get("awslogs-group")
            self.awslogs_stream_prefix = options["awslogs-stream-prefix"]
            self.awslogs_region = options.get("awslogs-region")
        else:
            self.log.warning("Task definition %s logs no output to CloudWatch Logs (its container %s has no awslogs "
                             "log configuration with a stream prefix): the suite's lines will not show here.",
                             suite.task_definition, suite.container)

    # ---- run it ------------------------------------------------------------------------------------------------
    def execute(self, context: Context) -> RegressionOutcome | None:
        service, suite = self._resolve()
        if suite is None:
            self.log.info("%s has no regression suite configured (catalog field regression): nothing to run. "
                          "Next: monitoring_gate.", service.name)
            return {"suite": None}
        plan = ReleaseRun(context).plan
        assert plan is not None, "regression_test runs only after preflight succeeded"
        image = pinned_image(plan["target_image"], plan["target_image_digest"])
        url = SmokeTestHook(service.http_conn_id).url_from_endpoint("")
        self._read_log_configuration(service, suite)
        try:
            live = EcsDeploymentHook(client=self.client).describe_service(service.ecs.cluster, service.ecs.service)
        except EcsDeploymentError as exc:
            raise AirflowException(f"Regression suite of {service.name}: {exc}. Retrying if retries remain.") from None
        # The suite runs where the service's tasks run: same launch type (or capacity providers) and network.
        if live.get("capacityProviderStrategy"):
            self.capacity_provider_strategy, self.launch_type = live["capacityProviderStrategy"], ""
        else:
            self.launch_type = live.get("launchType") or "FARGATE"
        self.network_configuration = live.get("networkConfiguration")
        environment = {IMAGE_UNDER_TEST: image, IMAGE_TAG: plan["image_tag"],
                       IMAGE_DIGEST: plan["target_image_digest"] or "", SERVICE_URL: url,
                       "OMNI_SERVICE": service.name, "OMNI_ENVIRONMENT": self.environment or plan["environment"]}
        self.overrides = {"containerOverrides": [{"name": suite.container, "environment": [
            {"name": name, "value": value} for name, value in environment.items()]}]}
        self.log.info("Running the regression suite of %s (%s, container %s) on cluster %s against %s at %s; time "
                      "limit %d min.%s", service.name, suite.task_definition, suite.container, self.cluster, image,
                      url, suite.timeout_minutes,
                      f" Its output: log group {self.awslogs_group}, stream prefix {self.awslogs_stream_prefix}."
                      if self._aws_logs_enabled() else "")
        return super().execute(context)  # starts (or reattaches to) the task, then defers until it stops

    def _try_reattach_task(self, started_by: str) -> None:
        """Reattach to the suite an earlier try of this run started: still running (the provider looks for that), or
        run to its end, whose verdict stands (a retry after the wait was lost must not run the suite again). A suite
        that was stopped before its end gave no verdict: then a new one starts."""
        super()._try_reattach_task(started_by)
        if self.arn:
            return
        arns = self.client.list_tasks(cluster=self.cluster, desiredStatus="STOPPED", startedBy=started_by)["taskArns"]
        tasks = self.client.describe_tasks(cluster=self.cluster, tasks=arns)["tasks"] if arns else []
        finished = [t for t in tasks if t.get("stopCode") == "EssentialContainerExited"]
        if finished:
            self.arn = max(finished, key=lambda t: t["createdAt"])["taskArn"]
            self.log.info("Reattaching to the suite an earlier try of this run ran to its end: %s.", self.arn)

    def defer(self, *, trigger: BaseTrigger, method_name: str, kwargs: dict[str, Any] | None = None,
              timeout: timedelta | int | float | None = None) -> Any:
        """Wait in :class:`EcsTaskStoppedTrigger`, with the arguments the provider gave its own trigger."""
        if isinstance(trigger, TaskDoneTrigger):
            trigger = EcsTaskStoppedTrigger(**trigger.serialize()[1])
        return super().defer(trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout)

    def execute_complete(  # type: ignore[override] # returns the suite's outcome, not only its last log line
            self, context: Context, event: dict[str, Any] | None = None) -> RegressionOutcome:
        event = validate_execute_complete_event(event)
        service, suite = self._resolve()
        assert suite is not None, "only a service with a suite defers"
        if event.get("status") == "timeout":
            self._stop_suite(service, event["task_arn"], f"regression_test gave up waiting: {event.get('message')}")
            raise AirflowFailException(f"Regression suite of {service.name} did not finish within its "
                                       f"{suite.timeout_minutes} min (catalog regression.timeout_minutes): "
                                       f"{event.get('message')}. Next: the release rolls back.")
        if event.get("status") != "success":
            raise AirflowException(f"Lost track of the regression suite of {service.name}: {event}. Retrying if "
                                   f"retries remain (a retry reattaches to the suite if it still runs).")
        self.arn, self.cluster = event["task_arn"], event["cluster"]
        # Where the trigger read the suite's output: the stream execute chose from the task definition.
        self.awslogs_group, self.awslogs_region = event.get("log_group"), event.get("log_region")
        self.suite_log_stream = event.get("log_stream")
        task = self.client.describe_tasks(cluster=self.cluster, tasks=[self.arn])["tasks"][0]
        container: dict[str, Any] = next(
            (c for c in task.get("containers", []) if c.get("name") == suite.container), {})
        exit_code = container.get("exitCode")
        seconds = _seconds(task.get("startedAt") or task.get("createdAt"), task.get("stoppedAt"))
        lines = self._last_lines()
        if exit_code not in (None, 0):
            raise AirflowFailException(
                f"Regression suite of {service.name} failed: exit code {exit_code} after "
                f"{_duration(seconds)} ({task.get('stoppedReason') or 'no reason given'}; task {self.arn}). "
                + (f"Its last {len(lines)} lines:\n" + "\n".join(lines) if lines else "It logged nothing.")
                + "\nNext: the release rolls back.")
        self._check_success_task()  # the provider's other verdicts: failed to start, host gone, still pending
        summary = lines[-1] if lines else ""
        self.log.info("Regression suite of %s passed (exit code 0) in %s: %s. Next: monitoring_gate.", service.name,
                      _duration(seconds), summary or "it logged nothing")
        return {"suite": suite.task_definition, "task_arn": self.arn, "cluster": self.cluster,
                "image": _environment_of(task, suite.container).get(IMAGE_UNDER_TEST, ""), "exit_code": 0,
                "seconds": seconds, "summary": summary}

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        """Stop the suite when its wait ended without a result (the trigger failed, or outlived its timeout): a
        suite left running would go on testing after the release has rolled back."""
        try:
            return super().resume_execution(next_method, next_kwargs, context)
        except TaskDeferralError as exc:  # also TaskDeferralTimeout
            service, suite = self._resolve()
            arn = context["ti"].xcom_pull(task_ids=self.task_id, key="ecs_task_arn")
            if suite is not None and arn:
                self._stop_suite(service, arn, f"regression_test lost its wait: {exc}")
            raise AirflowFailException(f"The wait for the regression suite of {service.name} failed: {exc}. "
                                       f"Next: the release rolls back.") from None

    def _stop_suite(self, service: Service, arn: str, reason: str) -> None:
        """Stop the suite's task, best effort: the stage fails either way."""
        try:
            self.client.stop_task(cluster=self.cluster, task=arn, reason=reason[:1024])
            self.log.warning("Stopped the regression suite of %s (%s): %s", service.name, arn, reason)
        except Exception:  # best effort: the failure that follows is what matters
            self.log.exception("Could not stop the regression suite of %s (%s); stop it by hand.", service.name, arn)

    def _last_lines(self) -> list[str]:
        """Return the suite's last lines, from the stream the trigger forwarded."""
        if not (self.awslogs_group and self.suite_log_stream):
            return []
        fetcher = AwsTaskLogFetcher(aws_conn_id=self.aws_conn_id, region_name=self.awslogs_region,
                                    log_group=self.awslogs_group, log_stream_name=self.suite_log_stream,
                                    fetch_interval=timedelta(seconds=1), logger=self.log)
        return [str(line) for line in fetcher.get_last_log_messages(self.number_logs_exception)]


def _environment_of(task: dict[str, Any], container: str) -> dict[str, str]:
    for override in (task.get("overrides") or {}).get("containerOverrides") or []:
        if override.get("name") == container:
            return {e["name"]: e["value"] for e in override.get("environment") or []}
    return {}


def _seconds(started: Any, stopped: Any) -> float | None:
    if isinstance(started, datetime) and isinstance(stopped, datetime):
        return round((stopped - started).total_seconds(), 1)
    return None


def _duration(seconds: float | None) -> str:
    return f"{seconds:.1f}s" if seconds is not None else "an unknown time"
