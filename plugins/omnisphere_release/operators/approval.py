"""approve_release: four eyes. Where the run's environment requires it (catalog ``approval: true``), the release waits
after preflight for one of the service's approvers, who is not the person who triggered the run, to approve the plan
preflight recorded. Elsewhere the task passes at once.

Built on Airflow's human-in-the-loop ApprovalOperator: the request (subject, body, a comment field) is shown on the
task's Required Actions page and answered there or through the REST API
(``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approve_release/-1/hitlDetails``). While it waits the
task is ``awaiting_input`` and holds no worker slot; the scheduler fails it when the deadline passes.

Who may answer is decided here, after the answer, whatever the auth manager let through: FAB identifies users by a
database number a task cannot look up, so assigning the request to usernames would lock every approver out there.
An answer from anyone else is refused, logged, and the request is asked again until the same deadline.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.providers.common.compat.sdk import conf
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Context, Param
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import AirflowFailException, TaskAwaitingInput
from airflow.sdk.execution_time.hitl import HITLUser, upsert_hitl_detail

from omnisphere_release.catalog import Catalog, Environment, Service, load_catalog
from omnisphere_release.checks import changed_since_plan, plain_text, promotion_summary
from omnisphere_release.contracts import ApprovalDecision, RefusedAnswer, ReleasePlan, ReleaseRun
from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsDeploymentHook
from omnisphere_release.hooks.postgres import schema_engine
from omnisphere_release.migrations.engine import version_label
from omnisphere_release.migrations.files import Migration, discover
from omnisphere_release.operators.common import hold_service, release_service, run_label

COMMENT = "comment"
# Shown until execute() writes the real request; the UI never shows it (the request is created in execute()).
PLACEHOLDER_SUBJECT = "Approve this release"


def eligible_approvers(service: Service, triggered_by: str | None) -> list[str]:
    """Return who may approve a release of ``service``: its catalog approvers, less the person who triggered it."""
    return [name for name in service.approvers if name != triggered_by]


def refusal_reason(responder: str | None, service: Service, triggered_by: str | None) -> str | None:
    """Say why ``responder`` may not answer this release's approval request, or None when they may."""
    if responder and responder == triggered_by:
        return f"{responder} triggered this run: four eyes means another person approves it"
    if responder not in service.approvers:
        return (f"{responder or 'an unknown user'} is not an approver of {service.name} (include/services.yaml "
                f"approvers: {', '.join(service.approvers) or 'none'})")
    return None


class ReleaseApprovalOperator(ApprovalOperator):
    """approve_release: wait for an approver where the environment requires one; pass at once elsewhere.

    Returns an :class:`ApprovalDecision`; a rejection, a timeout or a service without an eligible approver fails the
    task (no retry), which fails the run before anything changed. The decision is pushed in every case.
    """

    template_fields: Sequence[str] = ("service", "environment", "subject", "body")
    ui_color = "#fde68a"

    def __init__(self, *, service: str, environment: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("subject", PLACEHOLDER_SUBJECT)
        # The real deadline is set per run from the catalog; this one only keeps HITLOperator from taking the
        # stage's execution_timeout for it.
        kwargs.setdefault("response_timeout", timedelta(hours=24))
        # The form's one field. Airflow hands every operator the DAG's params too; HITLOperator keeps only the
        # task's own (source "task"), so the release's params never show in the form.
        given = kwargs.pop("params", None)
        params = given if isinstance(given, ParamsDict) else ParamsDict(given or {})
        params[COMMENT] = Param("", type=["null", "string"], title="Comment", source="task",
                                description="Why you approve or reject; kept in the report.")
        super().__init__(params=params, **kwargs)
        self.service, self.environment = service, environment

    def execute(self, context: Context) -> ApprovalDecision:
        catalog = load_catalog()
        environment = catalog.environment(self.environment)
        service = catalog.get(self.service, environment.name)
        plan = ReleaseRun(context).plan
        triggered_by = getattr(context.get("dag_run"), "triggering_user_name", None)
        decision: ApprovalDecision = {"required": environment.approval, "environment": environment.name,
                                      "triggered_by": triggered_by, "approved_by": None, "approved_at": None,
                                      "rejected_by": None, "rejected_at": None, "comment": "", "refused_answers": []}
        if not environment.approval:
            self.log.info("No approval needed: the %s environment does not require one (include/services.yaml, "
                          "environments.%s.approval). Next: backup.", environment.name, environment.name)
            return {**decision, "outcome": "not_required", "approvers": []}
        if plan is None:  # preflight succeeded, so this is a bug: never approve a plan nobody could read
            raise AirflowFailException("approve_release found no plan from preflight; nothing was changed")
        if plan["dry_run"]:
            self.log.info("Dry run: preflight printed the plan and nothing will change, so there is nothing to "
                          "approve.")
            return {**decision, "required": False, "outcome": "not_required", "approvers": []}

        approvers = eligible_approvers(service, triggered_by)
        if not approvers:
            self._record(context, {**decision, "outcome": "no_approver", "approvers": []})
            raise AirflowFailException(
                f"Nobody may approve this release of {service.name} in {environment.name}: the service's approvers "
                f"({', '.join(service.approvers) or 'none'}) less {triggered_by or 'the triggering user'}, who "
                f"triggered it, leave no one. Add approvers to {service.name} in include/services.yaml, or have one "
                "of them trigger it. Nothing was changed.")

        now = datetime.now(timezone.utc)
        deadline, why = _deadline(now, environment, plan)
        self.subject = f"Release {service.name} {plan['image_tag']} to {environment.name}?"
        self.body = request_body(plan, service, environment.name, triggered_by, approvers, deadline,
                                 _migrations(catalog.migrations_dir(service.name), plan["pending_versions"]))
        self.response_timeout = deadline - now
        self.assigned_users = _assigned(approvers)
        link = self._link(context)
        self.log.info("Waiting for %s to approve the release of %s to %s in %s (triggered by %s), until %s (%s); the "
                      "task holds no worker slot meanwhile. Answer on %s, or: omni-release approve|reject %s/%s. "
                      "Next: backup if approved; the run ends failed, with nothing changed, if rejected or timed out.",
                      " or ".join(approvers), service.name, plan["image_tag"], environment.name,
                      triggered_by or "unknown", deadline.isoformat(timespec="seconds"), why, link or "the task's "
                      "Required Actions page", context["ti"].dag_id, context["ti"].run_id)
        waiting = {"deadline": deadline.isoformat(), "approvers": approvers, "triggered_by": triggered_by,
                   "link": link, "refused": []}
        # Free the service while a person decides (hours, perhaps): an emergency rollback or a hotfix must not wait for
        # this answer. An approval takes it again and holds only if the service is still as the plan saw it.
        release_service(context, service, self.log)
        try:
            super().execute(context)
        except TaskAwaitingInput as parked:
            parked.kwargs = waiting  # what execute_complete needs, carried by the task instance across the wait
            raise
        raise AssertionError("HITLOperator.execute returned without parking the task")  # pragma: no cover

    def execute_complete(self, context: Context, event: dict[str, Any], deadline: str = "",
                         approvers: list[str] | None = None, triggered_by: str | None = None, link: str | None = None,
                         refused: list[RefusedAnswer] | None = None) -> ApprovalDecision:
        catalog = load_catalog()
        environment = catalog.environment(self.environment)
        service = catalog.get(self.service, environment.name)
        refused = list(refused or [])
        decision: ApprovalDecision = {"required": True, "environment": environment.name, "triggered_by": triggered_by,
                                      "approvers": list(approvers or []), "approved_by": None, "approved_at": None,
                                      "rejected_by": None, "rejected_at": None, "comment": "", "deadline": deadline,
                                      "refused_answers": refused, "link": link}
        what = f"the release of {service.name} in {environment.name}"
        if "error" in event:
            if event.get("error_type") != "timeout":
                self._record(context, {**decision, "outcome": "failed"})
                raise AirflowFailException(f"The approval request of {what} failed: {event['error']}. Nothing was "
                                           "changed; trigger the release again.")
            return self._timed_out(context, decision, what)

        chosen, params_input = event["chosen_options"], event.get("params_input") or {}
        self.validate_chosen_options(chosen)
        responder = (event.get("responded_by_user") or {}).get("name")
        at = event["responded_at"]
        at_text = at.isoformat(timespec="seconds") if isinstance(at, datetime) else str(at)
        option, comment = chosen[0], plain_text(params_input.get(COMMENT) or "")
        why = refusal_reason(responder, service, triggered_by)
        if why:
            refused.append({"by": responder, "option": option, "at": at_text, "why": why})
            remaining = datetime.fromisoformat(deadline) - datetime.now(timezone.utc)
            self.log.warning("Refused the answer %r of %s: %s. Only %s may answer; still waiting, until %s.",
                             option, responder, why, " or ".join(decision["approvers"]), deadline)
            if remaining <= timedelta(0):
                return self._timed_out(context, decision, what)
            # Clears the refused answer, so that the request is open again (on its page and through the API).
            upsert_hitl_detail(ti_id=context["task_instance"].id, options=self.options, subject=self.subject,
                               body=self.body, defaults=self.defaults, multiple=self.multiple,
                               params=self.serialized_params, assigned_users=self.assigned_users)
            raise TaskAwaitingInput(method_name="execute_complete", timeout=remaining,
                                    kwargs={"deadline": deadline, "approvers": decision["approvers"],
                                            "triggered_by": triggered_by, "link": link, "refused": refused})

        if option == self.REJECT:
            decision.update({"outcome": "rejected", "rejected_by": responder, "rejected_at": at_text,
                             "comment": comment})
            self._record(context, decision)
            raise AirflowFailException(
                f"Rejected by {responder} at {at_text}{f': {comment}' if comment else ' (no comment)'}. {what[0].upper()}"
                f"{what[1:]} ends here; nothing was changed: backup and every later stage do not run, the run ends "
                "failed.")
        decision.update({"outcome": "approved", "approved_by": responder, "approved_at": at_text, "comment": comment})
        self.log.info("Approved by %s at %s%s; %s was triggered by %s.", responder, at_text,
                      f" ({comment})" if comment else "", what, triggered_by or "an unknown user")
        self._hold_as_approved(context, service, catalog, decision)
        self.log.info("Next: backup.")
        return decision

    def _hold_as_approved(self, context: Context, service: Service, catalog: Catalog,
                          decision: ApprovalDecision) -> None:
        """Take the service back (it was free while the request waited) and refuse, changing nothing, if it is no
        longer what the approved plan saw: the approver approved that plan, not another one.

        Here rather than in backup: a refusal at backup would send the run down its rollback branch, which would
        "undo" the very hotfix that changed the service."""
        plan = ReleaseRun(context).plan
        assert plan is not None  # execute() refused a run without one
        try:
            hold_service(context, service, f"release of {service.name} to {plan['image_tag']} (approved)", self.log)
            live = EcsDeploymentHook(service.aws_conn_id).live_revision(service.ecs.cluster, service.ecs.service,
                                                                         service.ecs.container)
            status = schema_engine(service, catalog, run_label(self.dag_id, context["run_id"]), self.log).status()
            changed = changed_since_plan(plan, live.arn, status.current_version, live.deploying)
            refusal = changed and (f"Refused, nothing was changed: {service.name} changed while this release waited "
                                   f"for its approval ({changed}). The approver approved a plan that no longer "
                                   f"holds: trigger the release again, so that its plan is approved as the service "
                                   f"is now.")
        except AirflowFailException as exc:  # another operation holds the service now
            refusal = (f"Approved, but {exc}. Trigger the release again once it has ended, so that its plan is "
                       f"approved as the service is then.")
        except EcsDeploymentError as exc:
            refusal = (f"Approved, but whether {service.name} is still as the approved plan saw it cannot be read: "
                       f"{exc}. Nothing was changed; trigger the release again.")
        if refusal:
            self._record(context, {**decision, "outcome": "plan_changed"})
            raise AirflowFailException(refusal)
        self.log.info("%s is as the approved plan saw it (%s, schema version %s), and held by this run again.",
                      service.name, live.arn, version_label(status.current_version))

    def _timed_out(self, context: Context, decision: ApprovalDecision, what: str) -> ApprovalDecision:
        decision["outcome"] = "timed_out"
        self._record(context, decision)
        raise AirflowFailException(
            f"No approver ({', '.join(decision.get('approvers') or []) or 'none'}) answered by {decision['deadline']}: "
            f"{what} ends here; nothing was changed. Trigger it again when an approver is available.")

    @staticmethod
    def _record(context: Context, decision: ApprovalDecision) -> None:
        """Push the decision as the task's result also when the task fails: the report and release_failed read it."""
        context["ti"].xcom_push(key="return_value", value=dict(decision))

    def _link(self, context: Context) -> str | None:
        try:
            return self.generate_link_to_ui_from_context(context=context)
        except ValueError:  # no [api] base_url: the log names the page instead
            return None


def _deadline(now: datetime, environment: Environment, plan: ReleasePlan) -> tuple[datetime, str]:
    """Return when the request times out, and why then: the catalog's approval timeout, or the end of the
    maintenance window if that comes first (an approval after the window closed must not start the release)."""
    deadline = now + timedelta(hours=environment.approval_timeout_hours)
    why = f"approval_timeout_hours {environment.approval_timeout_hours:g} of the {environment.name} environment"
    window_end = (plan.get("window") or {}).get("window_end")
    if window_end and datetime.fromisoformat(str(window_end)) < deadline:
        return datetime.fromisoformat(str(window_end)), "the end of the maintenance window"
    return deadline, why


def _assigned(approvers: list[str]) -> list[HITLUser] | None:
    """Assign the request to the approvers where the auth manager's user ids are usernames (the simple auth manager):
    its API then refuses anyone else at the door (403). FAB's ids are database numbers a task cannot look up: there
    the request stays unassigned, and execute_complete refuses anyone else."""
    if not str(conf.get("core", "auth_manager", fallback="")).endswith("SimpleAuthManager"):
        return None
    return [HITLUser(id=name, name=name) for name in approvers]


def _migrations(folder: Any, versions: list[int]) -> list[Migration]:
    """Return the pending migrations' files, for their SQL (the plan in XCom carries the steps without it)."""
    wanted = set(versions)
    return [m for m in discover(folder) if m.version in wanted]


def request_body(plan: ReleasePlan, service: Service, environment: str, triggered_by: str | None,
                 approvers: list[str], deadline: datetime, migrations: list[Migration]) -> str:
    """Return the approval request's body (Markdown): the plan preflight recorded, what a rollback would undo, and
    who may answer until when."""
    window = plan.get("window") or {}
    evidence = promotion_summary(plan.get("promotion"))
    lines = [
        f"**{service.name}** to **{plan['image_tag']}** in **{environment}**, triggered by "
        f"**{triggered_by or 'unknown'}**. Reason: {plan.get('reason') or '(none given)'}",
        "",
        "| | before | after |",
        "| --- | --- | --- |",
        f"| image | `{plan['previous_image']}` | `{plan['target_image']}` |",
        f"| image digest | | `{plan.get('target_image_digest') or 'unknown'}` |",
        f"| schema version | {version_label(plan['schema_version'])} | {version_label(plan['target_version'])} |",
        f"| strategy | | {plan['strategy']} |",
        "",
        f"### Migrations ({len(plan['pending_versions'])} pending)",
        "",
    ]
    for migration in migrations:
        mode = "outside a transaction" if migration.up.no_transaction else "in one transaction"
        undo = "reversible" if migration.reversible else f"IRREVERSIBLE ({migration.irreversible_reason or 'no down file'})"
        lines += [f"**{migration.label}** ({mode}, {undo})", "", "```sql", migration.up.sql.strip(), "```", ""]
    if not plan["pending_versions"]:
        lines += ["No schema migration.", ""]
    lines += ["### Lint", ""] + ([f"- {finding}" for finding in plan["lint"]] or ["No finding."]) + [""]
    irreversible = [m.label for m in migrations if not m.reversible]
    lines += ["### Rollback plan (on any failure after approval)", "",
              f"- ECS back to `{plan['previous_task_definition'].rsplit('/', 1)[-1]}`",
              f"- schema back to {version_label(plan['schema_version'])} by the down files"
              + (f"; {', '.join(irreversible)} cannot be reverted: the backup is restored" if irreversible else ""),
              f"- a backup of the database is taken first, to s3://{plan['backup_bucket']}", ""]
    if evidence:
        lines += ["### Evidence", "", f"{evidence}", ""]
    if window.get("mode") == "forced":
        lines += ["### Window", "", f"FORCED outside the maintenance window: {window.get('force_reason')}", ""]
    elif window:
        lines += ["### Window", "", f"{window.get('window_start')} to {window.get('window_end')}", ""]
    lines += ["### Who may answer", "",
              f"{', '.join(approvers)} (not {triggered_by or 'the triggering user'}, who triggered it), until "
              f"{deadline.isoformat(timespec='minutes')}. No answer by then ends the release, with nothing changed."]
    return "\n".join(lines)
