"""wait_for_window: a release starts inside its service's maintenance window, or by an explicit, recorded choice."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, cast

from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from omnisphere_release.catalog import Service, load_catalog
from omnisphere_release.checks import Refused, decide_window, plain_text, schedule_of, unknown_conf_problem
from omnisphere_release.contracts import WindowDecision
from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsDeploymentHook
from omnisphere_release.operators.common import ServiceStageOperator


class WaitForMaintenanceWindowOperator(ServiceStageOperator):
    """Wait, deferred (no worker slot held), until the release may start.

    ``window``: ``next`` waits for the service's next maintenance window (or goes on at once if one is open);
    an ISO 8601 time waits until then, and the window lasts the catalog's duration from there; ``now`` goes on at once
    and needs ``force_reason``, which the report keeps.
    """

    template_fields = ("service", "environment", "window", "force_reason")

    def __init__(self, *, service: str, window: str = "next", force_reason: str = "", **kwargs: Any) -> None:
        super().__init__(service=service, **kwargs)
        self.window = window
        self.force_reason = force_reason

    def execute(self, context: Context) -> WindowDecision:
        unknown = unknown_conf_problem(getattr(context.get("dag_run"), "conf", None), self.dag.params.keys())
        if unknown:
            raise AirflowFailException(unknown)
        service = load_catalog().get(self.service, self.environment)
        schedule = schedule_of(service)
        now = datetime.now(timezone.utc)
        try:
            decision = decide_window(schedule, self.window, plain_text(self.force_reason), now,
                                     service.maintenance_window.max_days_ahead)
        except Refused as exc:
            raise AirflowFailException(str(exc)) from None
        decision["task_definition_at_trigger"] = self._running_task_definition(service)
        start = datetime.fromisoformat(decision["window_start"])
        if decision["mode"] == "forced":
            # In production the API let only a release manager force it (access.ForceWindowGuard); the report's
            # audit names who did.
            self.log.info("Releasing %s %s, outside its maintenance window (%s), forced by %s because: %s",
                          service.name, "now" if start <= now else f"at {decision['window_start']}",
                          schedule.summary(), getattr(context.get("dag_run"), "triggering_user_name", None)
                          or "an unnamed user", decision["force_reason"])
            if start <= now:
                return decision
        elif start <= now:
            self.log.info("The maintenance window is open (%s to %s, %s); starting the release.",
                          decision["window_start"], decision["window_end"], schedule.summary())
            return decision
        self.log.info("Waiting (deferred, no worker slot held) until %s to release %s: %s.", decision["window_start"],
                      service.name, f"its maintenance window closes {decision['window_end']} ({schedule.summary()})"
                      if decision["mode"] == "window" else "forced, outside its maintenance window")
        context["ti"].xcom_push(key="window", value=decision)
        self.defer(trigger=DateTimeTrigger(moment=start), method_name="execute_complete")

    def _running_task_definition(self, service: Service) -> str | None:
        try:
            return str(EcsDeploymentHook(service.aws_conn_id).describe_service(
                service.ecs.cluster, service.ecs.service)["taskDefinition"])
        except EcsDeploymentError as exc:  # preflight reads ECS again and refuses if it cannot
            self.log.warning("Could not read what %s runs now (%s); preflight cannot tell whether it changed while "
                             "this release waited.", service.name, exc)
            return None

    def execute_complete(self, context: Context, event: Any = None) -> WindowDecision:
        decision = cast("WindowDecision", context["ti"].xcom_pull(task_ids=self.task_id, key="window") or {})
        self.log.info("The maintenance window opened (%s); starting the release.", decision.get("window_start"))
        return {**decision, "waited_deferred": True}
