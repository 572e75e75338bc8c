"""smoke_test: the catalog's critical endpoints answer as expected, and every sampled /version answer is the released
image; retried with backoff within a deadline. Blue/green: first on green alone, on the test listener, before the
production switch."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, cast

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import Service, load_catalog
from omnisphere_release.contracts import ReleasePlan, ReleaseRun
from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsDeploymentHook
from omnisphere_release.hooks.http import ProbeResult, SmokeTestHook
from omnisphere_release.operators.common import ServiceStageOperator
from omnisphere_release.triggers.ecs import EcsServiceDeploymentTrigger

VERSION_PATH = "/version"
# GETs of /version per round: behind a load balancer, enough that a leftover task with a share of a few tens of
# percent answers at least one of them (one in three: 1 - (2/3)^10, 98 %; one in two: 99.9 %).
VERSION_SAMPLES = 10
# How long the switch to green may take once ECS's test-traffic hook answered SUCCEEDED (ECS moves at once);
# waited for deferred.
SWITCH_WAIT_SECONDS = 120.0


def _tag(image: str) -> str | None:
    name = image.partition("@")[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else None


def version_problem(body: Any, plan: ReleasePlan) -> str | None:
    """Return what is wrong with one /version answer for the release ``plan`` (naming what answered instead), or
    None when it answers the released image.

    By digest when both sides know one (a rebuilt tag is another image), else by the image reference or its tag,
    else by a ``version`` field equal to the released tag. An answer that names no image, digest or version cannot
    prove anything and is a problem too.
    """
    if not isinstance(body, dict):
        return "answered no JSON object"
    image = str(body.get("image") or "")
    digest = str(body.get("digest") or image.partition("@")[2] or "")
    version = body.get("version")
    wanted_digest = plan.get("target_image_digest")
    if digest and wanted_digest:
        return None if digest == wanted_digest else f"answered {image or digest}"
    if image:
        same = image == plan["target_image"] or (_tag(image) is not None and _tag(image) == plan["image_tag"])
        return None if same else f"answered {image}"
    if version is not None:
        return None if str(version) == plan["image_tag"] else f"answered version {version}"
    return "answered no image, digest or version"


def version_round(http: SmokeTestHook, plan: ReleasePlan) -> ProbeResult:
    """Sample /version VERSION_SAMPLES times: ok when every answer is the released image (the one rule, for the
    smoke test after a switch and for the monitoring gate once the last traffic step is at 100 %)."""
    return http.sample(VERSION_PATH, VERSION_SAMPLES, lambda body: version_problem(body, plan))


class HttpSmokeTestOperator(ServiceStageOperator):
    """Probe the service's smoke_tests (status, JSON fields, latency budget), and sample /version to see that every
    task behind the load balancer answers the released image; fail if a round never passes within the deadline.

    Blue/green held by ECS at its test-traffic hook: the same checks first run against green alone on the test
    listener (the HTTP connection's extra ``test_listener_port`` or ``test_listener_url``), and the answer to the
    hook lets ECS switch production to green or roll back before the switch. Canary and linear in steps: /version
    is left to the monitoring gate at 100 %, as both versions answer until then."""

    def execute(self, context: Context) -> dict[str, Any]:
        service, http, plan, has_version = self._prepare(context, announce=True)
        hook_parameter = cast("dict[str, Any]", ReleaseRun(context).deployment).get("test_traffic_hook")
        if hook_parameter:
            self._test_green(service, plan, str(hook_parameter), has_version)
            # ECS switches production to green as soon as its hook answered SUCCEEDED: wait for it deferred, holding
            # no worker slot, with the trigger ecs_deploy waits with (a failed read is tried again, within a budget).
            self.log.info("Waiting, deferred, up to %.0fs for ECS to switch production to green.", SWITCH_WAIT_SECONDS)
            self.defer(trigger=EcsServiceDeploymentTrigger(
                deployment_arn=ReleaseRun(context).deployment["deployment_arn"],
                deadline=time.time() + SWITCH_WAIT_SECONDS, aws_conn_id=service.aws_conn_id,
                done_on_traffic_shift=True, poll_seconds=1.0),
                method_name="after_switch", timeout=timedelta(seconds=SWITCH_WAIT_SECONDS + 300))
        return self._probe_production(service, http, plan, has_version)

    def after_switch(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Go on once ECS switched production to green: the production smoke test, as after any deployment."""
        service, http, plan, has_version = self._prepare(context, announce=False)
        status = event.get("status")
        if status == "error":  # unreadable for the trigger's whole budget: says nothing about the deployment
            raise AirflowException(f"Smoke test of {service.name}: {event.get('message')}. Retrying if retries "
                                   f"remain.")
        if status != "success":
            raise AirflowFailException(f"ECS did not switch production to green of {service.name} after its hook "
                                       f"answered SUCCEEDED: {event.get('summary')}. Next: the release rolls back.")
        self.log.info("Production traffic is on green: %s", event.get("summary"))
        return self._probe_production(service, http, plan, has_version)

    def _prepare(self, context: Context, announce: bool) -> tuple[Service, SmokeTestHook, ReleasePlan, bool]:
        """Return the service, its HTTP hook, the plan, and whether every sampled /version must be the release."""
        service = load_catalog().get(self.service, self.environment)
        http = SmokeTestHook(service.http_conn_id)
        plan = ReleaseRun(context).plan
        if plan is None:
            raise AirflowFailException(f"Smoke test of {service.name}: preflight recorded no release plan, so the "
                                       f"released image is unknown. Next: the release rolls back.")
        has_version = any(check.path == VERSION_PATH for check in service.smoke_tests)
        # A canary or linear deployment in steps serves both versions until its last step: every /version answer
        # cannot be the new one yet. Its steps are judged by the monitoring gate's comparison of the two task sets,
        # and the gate applies this rule once all traffic is on the new one.
        stepped = bool(cast("dict[str, Any]", ReleaseRun(context).deployment).get("steps"))
        if announce:
            wanted = plan.get("target_image_digest") or plan["target_image"]
            self.log.info("Smoke-testing %s: %d endpoint(s) at %s, deadline %.0fs; %s.", service.name,
                          len(service.smoke_tests), http.url_from_endpoint(""), service.smoke_deadline_seconds,
                          f"{VERSION_PATH} is checked by monitoring_gate at 100 % (the deployment shifts traffic in "
                          f"steps, so both versions answer until then)" if has_version and stepped else
                          f"{VERSION_SAMPLES} GETs of {VERSION_PATH} must each answer {wanted}" if has_version else
                          f"no {VERSION_PATH} smoke test in the catalog: which version answers is not checked")
        return service, http, plan, has_version and not stepped

    def _probe_production(self, service: Service, http: SmokeTestHook, plan: ReleasePlan,
                          has_version: bool) -> dict[str, Any]:
        def versions() -> list[ProbeResult]:
            return [version_round(http, plan)]

        results = http.probe_until_deadline(service.smoke_tests, service.smoke_deadline_seconds, service.name,
                                            also=versions if has_version else None)
        failed = [r for r in results if not r.ok]
        if failed:
            wanted = plan.get("target_image_digest") or plan["target_image"]
            raise AirflowFailException(
                f"Smoke test of {service.name} (release {plan['image_tag']}, {wanted}) failed after "
                f"{service.smoke_deadline_seconds:.0f}s: " + "; ".join(r.describe() for r in failed)
                + ". Next: the release rolls back.")
        self.log.info("Smoke test of %s passed. Next: monitoring_gate.", service.name)
        return {"endpoints": [r.describe() for r in results]}

    def _test_green(self, service: Service, plan: ReleasePlan, hook_parameter: str, has_version: bool) -> None:
        """Smoke-test green on the test listener while ECS holds it there, and answer ECS's hook: SUCCEEDED lets it
        switch production to green; FAILED makes it roll back before any production request reached green."""
        ecs = EcsDeploymentHook(service.aws_conn_id)
        http = SmokeTestHook(service.http_conn_id, listener="test")
        try:
            url = http.url_from_endpoint("")
        except ValueError as exc:
            ecs.answer_lifecycle_hook(hook_parameter, "FAILED")
            raise AirflowFailException(f"Smoke test of {service.name}'s green side: {exc}. Answered ECS's "
                                       f"test-traffic hook FAILED: ECS rolls back before the production switch. "
                                       f"Next: rollback_ecs waits for it.") from None
        self.log.info("Smoke-testing green (the new task set) of %s on the test listener %s before the production "
                      "switch: %d endpoint(s)%s.", service.name, url, len(service.smoke_tests),
                      f" and {VERSION_SAMPLES} GETs of {VERSION_PATH}" if has_version else "")
        results = http.probe_until_deadline(service.smoke_tests, service.smoke_deadline_seconds,
                                            f"{service.name} (green, test listener)",
                                            also=(lambda: [version_round(http, plan)]) if has_version else None)
        failed = [r for r in results if not r.ok]
        verdict = "FAILED" if failed else "SUCCEEDED"
        try:
            ecs.answer_lifecycle_hook(hook_parameter, verdict)
        except EcsDeploymentError as exc:
            raise AirflowFailException(f"Smoke test of {service.name}'s green side {verdict.lower()}, but ECS's "
                                       f"test-traffic hook could not be answered: {exc}. Next: the release rolls "
                                       f"back (rollback_ecs stops the held deployment with ROLLBACK).") from None
        if failed:
            raise AirflowFailException(
                f"Smoke test of {service.name}'s green side on the test listener failed after "
                f"{service.smoke_deadline_seconds:.0f}s: " + "; ".join(r.describe() for r in failed)
                + ". Answered ECS's test-traffic hook FAILED: ECS rolls back before the production switch, so no "
                  "production request reached green. Next: rollback_ecs waits for the rollback.")
        self.log.info("Green of %s passed on the test listener; answered ECS's hook SUCCEEDED: production switches "
                      "to green now.", service.name)
