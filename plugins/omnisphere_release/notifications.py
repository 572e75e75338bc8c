"""Release news: every release tells its service's team that it started, that it awaits approval, and how it ended,
on the channels the catalog names for the team (``teams.<team>.sns_topics`` and ``emails`` in include/services.yaml).

Where each piece of news is sent from (all of them Airflow notifiers and callbacks, wired by :func:`release_callbacks`):

- *started*: preflight's on_success_callback. Preflight changes nothing; once it passed, the release knows the image
  before and after and begins to act (a refused release is told by its outcome instead).
- *awaiting approval*: a notifier of the approve_release human-in-the-loop task, called once the request exists
  (never when the environment needs no approval).
- the *outcome*: the DAG's on_success_callback and on_failure_callback, run by the DAG processor once the run ended,
  whatever the report task did. The outcome is the report's own rule (:func:`omnisphere_release.report.outcome_of`).
- the failing stage's *cause*: every task's on_failure_callback keeps the first line of its error (redacted) in XCom,
  where the outcome reads it; Airflow keeps no error of a task anywhere else a callback can read.

A piece of news that cannot be sent (no channel, SNS throttled or down, a topic that does not exist) is logged, with
the whole message, and never raises: a notification never changes a release's outcome. Messages hold no secret:
names, images, states, the redacted first line of an error, who triggered, and the run's URL.
"""

from __future__ import annotations

import html
import logging
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import quote

from airflow.providers.amazon.aws.hooks.sns import SnsHook
from airflow.providers.amazon.aws.notifications.sns import SnsNotifier
from airflow.providers.common.compat.notifier import BaseNotifier
from airflow.providers.smtp.notifications.smtp import SmtpNotifier
from airflow.sdk import Context
from airflow.sdk.configuration import conf
from botocore.config import Config

from omnisphere_release.catalog import Service, Team, load_catalog
from omnisphere_release.checks import plain_text
from omnisphere_release.contracts import APPROVE_RELEASE, REPORT, ROLLBACK_STAGES, ReleaseRun, failed_stages
from omnisphere_release.report import OUTCOME_TEXT, outcome_of

STARTED = "started"
AWAITING_APPROVAL = "awaiting_approval"
OUTCOME = "outcome"
EVENTS = (STARTED, AWAITING_APPROVAL, OUTCOME)
# The XCom key under which a failed task keeps the first line of its error, for the outcome's message.
FAILURE_KEY = "omni_failure"
MAX_CAUSE_CHARS = 300
MAX_SUBJECT_CHARS = 99  # SNS: fewer than 100 ASCII characters, no line break
log = logging.getLogger(__name__)
# News must not hold a task, or the DAG processor (whose callbacks share its dag_file_processor_timeout, 50 s by
# default), for long: throttling is retried twice, an unreachable SNS gives up within about 30 s a topic (3 attempts
# of at most 3 s to connect and 5 s to answer). The AWS connection's config_kwargs win, option by option.
NEWS_CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=3, read_timeout=5)

EVENT_TEXT = {STARTED: "STARTED: preflight passed, the release is under way",
              AWAITING_APPROVAL: "AWAITING APPROVAL: nothing changes until an approver answers"}
# Outcomes nobody needs to hear of: a dry run changes nothing and its author reads the plan in preflight's log.
SILENT_OUTCOMES = {"dry_run"}
# Credentials that could be written inline in an error's first line: a URL's user:password@, key=value pairs.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s:@]+:[^@\s]*@", re.IGNORECASE)
_KEY_VALUE_SECRET = re.compile(r"(?P<key>\b(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key)\w*"
                               r"\s*[=:]\s*)(?P<value>[^\s,;&'\"]+)", re.IGNORECASE)


@dataclass(frozen=True)
class ReleaseNews:
    """What one message says: the facts of one release at one moment, read from its run."""

    event: str  # started, awaiting_approval, or the outcome (released, rolled_back, rollback_incomplete, ...)
    service: str
    environment: str
    run_url: str
    image_before: str | None = None
    image_after: str | None = None
    image_tag: str | None = None
    triggered_by: str | None = None
    reason: str = ""
    failed_stage: str | None = None  # the first main stage that failed
    cause: str | None = None  # the first line of its error, redacted
    rollback_failures: dict[str, str | None] = field(default_factory=dict)  # failed rollback step -> its cause
    approved_by: str | None = None
    rejected_by: str | None = None
    approval_link: str | None = None
    approvers: tuple[str, ...] = ()
    dry_run: bool = False

    @property
    def headline(self) -> str:
        return EVENT_TEXT.get(self.event) or OUTCOME_TEXT.get(self.event) or self.event.upper()

    def subject(self) -> str:
        """Return a one-line ASCII subject under SNS's 100 characters: what, where, how it stands."""
        word = self.headline.split(":", 1)[0]
        text = f"[OmniSphere] {self.service} ({self.environment}): {word}"
        if self.image_tag:
            text += f" {self.image_tag}"
        text = text.encode("ascii", "replace").decode()
        return text if len(text) <= MAX_SUBJECT_CHARS else text[:MAX_SUBJECT_CHARS - 3] + "..."

    def body(self) -> str:
        """Return the message: one fact a line, the run's URL last."""
        lines = [f"Release of {self.service} to {self.environment}: {self.headline}",
                 f"Image: {self.image_before or 'unknown'} -> {self.image_after or self.image_tag or 'unknown'}"]
        if self.failed_stage:
            lines.append(f"Failed stage: {self.failed_stage}" + (f": {self.cause}" if self.cause else ""))
        for step, cause in self.rollback_failures.items():
            lines.append(f"Rollback step failed: {step}" + (f": {cause}" if cause else ""))
        if self.event == "rollback_incomplete":
            lines.append("ACTION NEEDED: the service or its database may be neither as before nor as released. "
                         "Read the report task's log and the runbook's rollback section, then use rollback_"
                         f"{self.service}.")
        lines.append(f"Triggered by: {self.triggered_by or 'unknown'}")
        if self.reason:
            lines.append(f"Reason: {self.reason}")
        if self.approved_by:
            lines.append(f"Approved by: {self.approved_by}")
        if self.rejected_by:
            lines.append(f"Rejected by: {self.rejected_by}")
        if self.event == AWAITING_APPROVAL:
            lines.append(f"Approvers: {', '.join(self.approvers) or 'none in the catalog'} "
                         "(never the person who triggered the run)")
            if self.approval_link:
                lines.append(f"Approve or reject: {self.approval_link}")
        lines.append(f"Run: {self.run_url}")
        return "\n".join(lines) + "\n"

    def attributes(self) -> dict[str, str]:
        """Return the SNS message attributes a subscription can filter on (e.g. page only on rollback_incomplete)."""
        return {"service": self.service, "environment": self.environment,
                "event": self.event if self.event in (STARTED, AWAITING_APPROVAL) else OUTCOME,
                "outcome": self.event}


def redact_text(text: Any) -> str:
    """Return one plain line with the secrets Airflow masks, URL passwords and key=value secrets replaced by ***."""
    from airflow.sdk._shared.secrets_masker import redact

    line = plain_text(redact(str(text)))
    line = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}***@", line)
    return _KEY_VALUE_SECRET.sub(lambda m: f"{m['key']}***", line)


def first_line(error: Any) -> str | None:
    """Return the first non-empty line of an error, redacted and bounded; None without an error."""
    if error is None:
        return None
    text = str(error).strip() or type(error).__name__
    line = redact_text(text.splitlines()[0])
    return line if len(line) <= MAX_CAUSE_CHARS else line[:MAX_CAUSE_CHARS - 3] + "..."


def run_url(dag_id: str, run_id: str) -> str:
    """Return the run's page in the Airflow UI: [api] base_url + /dags/<dag_id>/runs/<run_id>."""
    base = conf.get("api", "base_url", fallback="http://localhost:8080/")
    return f"{base.rstrip('/')}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def record_failure(context: Context) -> None:
    """on_failure_callback of every task: keep the first line of the error where the outcome's message reads it."""
    try:
        cause = first_line(context.get("exception"))
        if cause:
            context["ti"].xcom_push(key=FAILURE_KEY, value=cause)
    except Exception:  # a callback must never change what the task did
        log.exception("Could not record the cause of %s's failure for the release news; the outcome's message will "
                      "name the stage without it", context.get("task_instance"))


def news_of(event: str, context: Context) -> ReleaseNews:
    """Read one release's facts from its run (through the Task SDK: in a task, or in the DAG processor)."""
    ti = context["ti"]
    run = ReleaseRun(context)
    plan: dict[str, Any] = dict(run.plan or {})
    params = dict(context.get("params") or {})
    approval = dict(run.output(APPROVE_RELEASE) or {})
    dag_run = context.get("dag_run")
    triggered_by = getattr(dag_run, "triggering_user_name", None) or approval.get("triggered_by")
    news: dict[str, Any] = {
        "service": plan.get("service") or str(params.get("service") or ti.dag_id.removeprefix("release_")),
        "environment": plan.get("environment") or str(params.get("environment") or "default"),
        "run_url": run_url(ti.dag_id, ti.run_id),
        "image_before": plan.get("previous_image"), "image_after": plan.get("target_image"),
        "image_tag": plan.get("image_tag") or params.get("image_tag"),
        "reason": redact_text(plan.get("reason") or params.get("reason") or ""),
        "approved_by": approval.get("approved_by"), "rejected_by": approval.get("rejected_by"),
        "dry_run": bool(plan.get("dry_run")),
    }
    if event != OUTCOME:
        return ReleaseNews(event=event, triggered_by=triggered_by, **news)
    states = run.task_states()
    if not triggered_by:  # the scheduler's callback request carries it, dag.test()'s own does not; the report has it
        triggered_by = (run.output(REPORT) or {}).get("triggered_by")
    outcome = outcome_of(states, run.plan, approval)  # type: ignore[arg-type]
    failed = failed_stages(states)
    stage = failed[0] if failed else None
    rollback = {step: _cause(run, step) for step in ROLLBACK_STAGES if states.get(step) == "failed"}
    return ReleaseNews(event=outcome, triggered_by=triggered_by, failed_stage=stage,
                       cause=_cause(run, stage) if stage else None, rollback_failures=rollback, **news)


def _cause(run: ReleaseRun, task_id: str) -> str | None:
    cause = run.ti.xcom_pull(task_ids=task_id, key=FAILURE_KEY)
    return str(cause) if cause else None


class ReleaseNotifier(BaseNotifier):
    """Tell a release's news to its service's team: every SNS topic, and the e-mail addresses, the catalog names.

    Sends through the amazon provider's SnsNotifier (the service's AWS connection in the run's environment, the
    topic's own region) and the smtp provider's SmtpNotifier. Never raises: a channel that fails is logged, with the
    message, and the others are still tried.
    """

    def __init__(self, *, service: str, event: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if event not in EVENTS:
            raise ValueError(f"ReleaseNotifier event {event!r} is unknown; use one of {', '.join(EVENTS)}")
        self.service, self.event = service, event

    def __call__(self, *args: Any) -> None:
        # Airflow's notifier re-raises what notify raised, and a human-in-the-loop task would then fail: swallow here.
        try:
            super().__call__(*args)
        except Exception:  # a notification never changes the release's outcome
            self.log.exception("Could not tell the %s news of %s; the release goes on, unchanged", self.event,
                               self.service)

    def notify(self, context: Context) -> None:
        news = news_of(self.event, context)
        if self.event == AWAITING_APPROVAL:
            news = _with_approval_request(news, context)
        if news.event in SILENT_OUTCOMES or news.dry_run:
            self.log.info("No %s news for %s: a dry run changes nothing, its plan is in preflight's log", self.event,
                          self.service)
            return
        catalog = load_catalog()
        service = catalog.get(self.service, news.environment)
        self.send(news, service, catalog.team(service.team), context)

    def send(self, news: ReleaseNews, service: Service, team: Team, context: Context) -> int:
        """Send ``news`` to every channel of ``team``; return how many took it. Log each send and each failure."""
        channels = [*(("sns", topic) for topic in team.sns_topics), *([("email", ", ".join(team.emails))]
                                                                        if team.emails else [])]
        if not channels:
            self.log.warning("No channel for the news of %s (%s): team %r has no sns_topics or emails in the catalog "
                             "(include/services.yaml, teams). Add one to be told. The news:\n%s", service.name,
                             news.event, service.team or "(none)", news.body())
            return 0
        subject, body, sent, failed = news.subject(), news.body(), 0, []
        for kind, target in channels:
            started = time.monotonic()
            try:
                if kind == "sns":
                    _NewsSnsNotifier(aws_conn_id=service.aws_conn_id, target_arn=target, message=body,
                                     subject=subject, message_attributes=news.attributes(),
                                     region_name=_region_of(target)).notify(context)
                else:
                    SmtpNotifier(to=list(team.emails), subject=subject,
                                 html_content=f"<pre>{html.escape(body)}</pre>").notify(context)
            except Exception as exc:  # noqa: BLE001 - one channel down must not silence the others
                failed.append(target)
                self.log.warning("Could not send the %s news of %s (%s) to %s %s after %.1fs: %s: %s", news.event,
                                 service.name, news.environment, kind, target, time.monotonic() - started,
                                 type(exc).__name__, first_line(exc))
                continue
            sent += 1
            self.log.info("Sent the %s news of %s (%s) to %s %s in %.1fs", news.event, service.name,
                          news.environment, kind, target, time.monotonic() - started)
        if failed:
            self.log.warning("The %s news of %s reached %d of %d channels (not %s); the release's outcome is "
                             "unchanged. The news, for whoever reads this log:\n%s", news.event, service.name, sent,
                             len(channels), ", ".join(failed), body)
        return sent


class _NewsSnsHook(SnsHook):
    """SnsHook whose client gives up soon (NEWS_CLIENT_CONFIG), unless the AWS connection says otherwise."""

    @property
    def config(self) -> Config:
        connection = self.conn_config.botocore_config
        return NEWS_CLIENT_CONFIG.merge(connection) if connection else NEWS_CLIENT_CONFIG


class _NewsSnsNotifier(SnsNotifier):
    """The amazon provider's SnsNotifier, publishing through :class:`_NewsSnsHook`."""

    @cached_property
    def hook(self) -> SnsHook:
        return _NewsSnsHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name)


def _with_approval_request(news: ReleaseNews, context: Context) -> ReleaseNews:
    """Add the approval request's page and the catalog's approvers (the task asking is a human-in-the-loop one)."""
    from dataclasses import replace

    task = context.get("task")
    link = None
    try:
        link = task.generate_link_to_ui_from_context(context=context)  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - no [api] base_url, or not a HITL task: the run's URL is in the message
        link = None
    approvers: tuple[str, ...] = ()
    try:
        approvers = load_catalog().get(news.service, news.environment).approvers
    except Exception:  # noqa: BLE001 - the message still names the service and links the run
        approvers = ()
    return replace(news, approval_link=link, approvers=approvers)


def _region_of(arn: str) -> str | None:
    """Return the region of an SNS ARN (arn:aws:sns:<region>:<account>:<name>); None when it names none."""
    parts = arn.split(":")
    return parts[3] if len(parts) > 5 and parts[2] == "sns" and parts[3] else None


@dataclass(frozen=True)
class ReleaseCallbacks:
    """The keyword arguments the release DAG factory passes to the DAG, its default_args and two of its tasks."""

    dag: dict[str, Any]
    default_args: dict[str, Any]
    preflight: dict[str, Any]
    approval: dict[str, Any]


def release_callbacks(service: Service) -> ReleaseCallbacks:
    """Return the callbacks and notifiers that tell ``service``'s team about each of its releases."""
    outcome = ReleaseNotifier(service=service.name, event=OUTCOME)
    return ReleaseCallbacks(
        dag={"on_success_callback": [outcome], "on_failure_callback": [outcome]},
        default_args={"on_failure_callback": [record_failure]},
        preflight={"on_success_callback": [ReleaseNotifier(service=service.name, event=STARTED)]},
        approval={"notifiers": [ReleaseNotifier(service=service.name, event=AWAITING_APPROVAL)]},
    )
