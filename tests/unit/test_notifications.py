"""Release news without a devstack: what each message says, that it holds no secret, which outcome it tells, and that
a channel that fails is logged and never raises. The e2e tests (tests/e2e/test_notifications.py) read the messages
from the devstack's SNS."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from omnisphere_release.catalog import Team, load_catalog
from omnisphere_release.notifications import (
    AWAITING_APPROVAL,
    FAILURE_KEY,
    OUTCOME,
    STARTED,
    ReleaseNews,
    ReleaseNotifier,
    first_line,
    record_failure,
    release_callbacks,
    run_url,
)

SERVICE = "auth-service"
RUN_ID = "manual__2026-11-26T17:00:00+00:00"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:omnisphere-identity-releases"
PLAN = {"service": SERVICE, "environment": "staging", "image_tag": "2.4.0", "dry_run": False, "reason": "fix login",
        "previous_image": "registry/omnisphere/auth-service:1.0.0",
        "target_image": "registry/omnisphere/auth-service@sha256:abc"}
DSN = "postgresql://omni_auth:Sup3rSecretPassw0rd@127.0.0.1:5432/auth"


class FakeTaskInstance:
    """The part of a runtime task instance the news reads: XCom by task and key, and the run's task states."""

    dag_id = f"release_{SERVICE}"
    run_id = RUN_ID

    def __init__(self, states: dict[str, str], outputs: dict[str, Any], causes: dict[str, str] | None = None):
        self.states, self.outputs, self.causes = states, outputs, causes or {}
        self.pushed: dict[str, Any] = {}

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        return self.causes.get(task_ids) if key == FAILURE_KEY else self.outputs.get(task_ids)

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value

    def get_task_states(self, dag_id: str, run_ids: list[str]) -> dict[str, dict[str, str]]:
        return {run_ids[0]: self.states}


class FakeRun:
    triggering_user_name = "alice"


def context_of(states: dict[str, str], outputs: dict[str, Any] | None = None, causes: dict[str, str] | None = None,
               **extra: Any) -> dict[str, Any]:
    outputs = {"preflight": PLAN} if outputs is None else outputs
    return {"ti": FakeTaskInstance(states, outputs, causes), "dag_run": FakeRun(),
            "params": {"environment": "staging", "image_tag": "2.4.0"}, **extra}


@pytest.fixture()
def published(monkeypatch) -> list[dict[str, Any]]:
    """Every SNS publish and e-mail the notifier asks for, instead of sending it."""
    from airflow.providers.amazon.aws.notifications.sns import SnsNotifier
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(SnsNotifier, "notify", lambda self, context: sent.append(
        {"sns": self.target_arn, "subject": self.subject, "message": self.message, "region": self.region_name,
         "attributes": self.message_attributes, "conn": self.aws_conn_id}))
    monkeypatch.setattr(SmtpNotifier, "notify", lambda self, context: sent.append(
        {"email": self.to, "subject": self.subject, "html": self.html_content}))
    return sent


def news(**changes: Any) -> ReleaseNews:
    facts: dict[str, Any] = {"event": "rollback_incomplete", "service": SERVICE, "environment": "production",
                             "run_url": f"https://airflow.example.com/dags/release_{SERVICE}/runs/x",
                             "image_before": PLAN["previous_image"], "image_after": PLAN["target_image"],
                             "image_tag": "2.4.0", "triggered_by": "alice", "reason": "fix login",
                             "failed_stage": "smoke_test", "cause": "GET /health -> 503",
                             "rollback_failures": {"rollback_schema": "down file 004 failed"}, "approved_by": "bob"}
    return ReleaseNews(**{**facts, **changes})


def test_a_message_names_service_environment_images_outcome_stage_cause_trigger_and_run():
    body = news().body()
    assert body.splitlines()[0] == (f"Release of {SERVICE} to production: FAILED, ROLLBACK INCOMPLETE: a person must "
                                    "act (see the rollback section)")
    for line in (f"Image: {PLAN['previous_image']} -> {PLAN['target_image']}",
                 "Failed stage: smoke_test: GET /health -> 503",
                 "Rollback step failed: rollback_schema: down file 004 failed",
                 "Triggered by: alice", "Reason: fix login", "Approved by: bob",
                 f"Run: https://airflow.example.com/dags/release_{SERVICE}/runs/x"):
        assert line in body.splitlines()
    assert any(line.startswith("ACTION NEEDED") for line in body.splitlines())
    assert news().attributes() == {"service": SERVICE, "environment": "production", "event": OUTCOME,
                                   "outcome": "rollback_incomplete"}
    assert news(event=STARTED).attributes()["event"] == STARTED


def test_the_subject_is_one_ascii_line_under_100_characters():
    assert news().subject() == f"[OmniSphere] {SERVICE} (production): FAILED, ROLLBACK INCOMPLETE 2.4.0"
    long = news(service="a" * 63, environment="production-eu-west-1-blue", image_tag="1." + "9" * 60).subject()
    assert len(long) < 100 and long.endswith("...") and long.isascii() and "\n" not in long
    assert news(event="released", failed_stage=None, rollback_failures={}).subject().endswith("RELEASED 2.4.0")


def test_an_error_is_told_by_its_first_line_without_secrets():
    from airflow.sdk.log import mask_secret

    mask_secret("masked-by-airflow-0123456789")
    error = RuntimeError(f"could not connect to {DSN}: password=hunter2hunter2, token: masked-by-airflow-0123456789"
                         "\nTraceback line two")
    line = first_line(error)
    assert line is not None and "\n" not in line and "Traceback" not in line
    for secret in ("Sup3rSecretPassw0rd", "hunter2hunter2", "masked-by-airflow-0123456789"):
        assert secret not in line
    assert "postgresql://***@127.0.0.1:5432/auth" in line
    assert len(first_line("x" * 1000) or "") == 300
    assert first_line(None) is None and first_line(ValueError()) == "ValueError"


def test_the_run_url_is_the_api_base_url_and_the_quoted_run(monkeypatch):
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/base/")
    assert run_url(f"release_{SERVICE}", RUN_ID) == ("https://airflow.example.com/base/dags/release_auth-service/runs/"
                                                     "manual__2026-11-26T17%3A00%3A00%2B00%3A00")


@pytest.mark.parametrize(("states", "outputs", "expected", "stage"), [
    ({"preflight": "success", "finalize": "success"}, None, "released", None),
    ({"preflight": "success", "smoke_test": "failed", "verify_rollback": "success"}, None, "rolled_back", "smoke_test"),
    ({"preflight": "success", "ecs_deploy": "failed", "rollback_ecs": "failed", "verify_rollback": "failed"}, None,
     "rollback_incomplete", "ecs_deploy"),
    ({"preflight": "failed", "backup": "upstream_failed"}, {}, "refused", "preflight"),
])
def test_the_outcome_is_the_reports_rule_with_the_failing_stage_and_its_cause(published, states, outputs, expected,
                                                                             stage):
    causes = {stage: f"{stage} broke"} if stage else {}
    if expected == "rollback_incomplete":
        causes["rollback_ecs"] = "ECS answered AccessDenied"
    context = context_of(states, outputs, causes)
    ReleaseNotifier(service=SERVICE, event=OUTCOME)(context)
    [message] = published
    assert message["attributes"]["outcome"] == expected and message["sns"] == TOPIC
    assert message["region"] == "eu-west-1" and message["conn"] == "aws_default"
    assert (f"Failed stage: {stage}: {stage} broke" in message["message"]) is bool(stage)
    assert ("Rollback step failed: rollback_ecs: ECS answered AccessDenied" in message["message"]) is (
        expected == "rollback_incomplete")
    assert "Triggered by: alice" in message["message"]


def test_who_triggered_comes_from_the_report_when_the_run_does_not_say(published):
    context = context_of({"preflight": "success", "finalize": "success"},
                         {"preflight": PLAN, "report": {"triggered_by": "carol"}}, dag_run=None)
    ReleaseNotifier(service=SERVICE, event=OUTCOME)(context)
    assert "Triggered by: carol" in published[0]["message"]


def test_a_dry_run_tells_nothing(published):
    plan = {**PLAN, "dry_run": True}
    ReleaseNotifier(service=SERVICE, event=STARTED)(context_of({"preflight": "success"}, {"preflight": plan}))
    ReleaseNotifier(service=SERVICE, event=OUTCOME)(context_of({"preflight": "success"}, {"preflight": plan}))
    assert published == []


def test_started_tells_the_plan_before_anything_changes(published):
    ReleaseNotifier(service=SERVICE, event=STARTED)(context_of({"preflight": "success"}))
    [message] = published
    assert message["subject"] == f"[OmniSphere] {SERVICE} (staging): STARTED 2.4.0"
    assert f"Image: {PLAN['previous_image']} -> {PLAN['target_image']}" in message["message"]
    assert message["attributes"] == {"service": SERVICE, "environment": "staging", "event": STARTED,
                                     "outcome": STARTED}


def test_awaiting_approval_names_the_approvers_and_links_the_request(published, monkeypatch, tmp_path):
    import yaml

    from omnisphere_release.catalog import DEFAULT_CATALOG

    catalog = yaml.safe_load(DEFAULT_CATALOG.read_text())
    next(s for s in catalog["services"] if s["name"] == SERVICE)["approvers"] = ["bob", "dana"]
    path = tmp_path / "services.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    monkeypatch.setenv("OMNISPHERE_CATALOG", str(path))

    class ApprovalTask:
        @staticmethod
        def generate_link_to_ui_from_context(context: Any) -> str:
            return "https://airflow.example.com/dags/release_auth-service/runs/x/required_actions"

    ReleaseNotifier(service=SERVICE, event=AWAITING_APPROVAL)(context_of({"preflight": "success"},
                                                                         task=ApprovalTask()))
    body = published[0]["message"]
    assert "AWAITING APPROVAL" in body and "Approvers: bob, dana (never the person who triggered the run)" in body
    assert "Approve or reject: https://airflow.example.com/dags/release_auth-service/runs/x/required_actions" in body


def test_a_channel_that_fails_is_logged_and_the_others_still_get_the_news(monkeypatch, capfd):
    from airflow.providers.amazon.aws.notifications.sns import SnsNotifier
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    throttled = "arn:aws:sns:eu-west-1:123456789012:throttled"
    down = "arn:aws:sns:eu-west-1:123456789012:down"
    delivered: list[str] = []

    def publish(self: SnsNotifier, context: Any) -> None:
        if self.target_arn == throttled:
            raise ClientError({"Error": {"Code": "Throttling", "Message": "Rate exceeded"}}, "Publish")
        if self.target_arn == down:
            raise EndpointConnectionError(endpoint_url="https://sns.eu-west-1.amazonaws.com/")
        delivered.append(self.target_arn)

    monkeypatch.setattr(SnsNotifier, "notify", publish)
    monkeypatch.setattr(SmtpNotifier, "notify", lambda self, context: delivered.append(",".join(self.to)))
    service = load_catalog().get(SERVICE)
    team = Team(sns_topics=(throttled, down, TOPIC), emails=("identity-oncall@example.com",))
    notifier = ReleaseNotifier(service=SERVICE, event=OUTCOME)
    assert notifier.send(news(), service, team, {}) == 2
    assert delivered == [TOPIC, "identity-oncall@example.com"]
    log = "".join(capfd.readouterr())
    assert f"to sns {throttled}" in log and "Throttling" in log and f"to sns {down}" in log
    assert "reached 2 of 4 channels" in log and "the release's outcome is unchanged" in log
    assert "Failed stage: smoke_test: GET /health -> 503" in log  # the news itself, for whoever reads the log


def test_the_sns_client_gives_up_soon_unless_the_connection_says_otherwise(monkeypatch):
    import json

    from omnisphere_release.notifications import _NewsSnsNotifier

    config = _NewsSnsNotifier(aws_conn_id=None, target_arn=TOPIC, message="m").hook.config
    assert (config.retries, config.connect_timeout, config.read_timeout) == (
        {"mode": "standard", "max_attempts": 2}, 3, 5)
    monkeypatch.setenv("AIRFLOW_CONN_NEWS_AWS", json.dumps({"conn_type": "aws", "extra": {
        "config_kwargs": {"retries": {"mode": "adaptive", "max_attempts": 6}}}}))
    config = _NewsSnsNotifier(aws_conn_id="news_aws", target_arn=TOPIC, message="m").hook.config
    assert (config.retries, config.connect_timeout) == ({"mode": "adaptive", "max_attempts": 6}, 3)


def test_a_team_without_channels_is_told_in_the_log(capfd):
    service = load_catalog().get(SERVICE)
    assert ReleaseNotifier(service=SERVICE, event=OUTCOME).send(news(), service, Team(), {}) == 0
    assert "has no sns_topics or emails in the catalog" in "".join(capfd.readouterr())


def test_a_notifier_that_cannot_read_its_run_never_raises(capfd):
    # No task instance (nor Task SDK channel): what a broken callback context looks like. Airflow's notifier would
    # re-raise, and a human-in-the-loop task would then fail.
    ReleaseNotifier(service=SERVICE, event=OUTCOME)({})
    log = "".join(capfd.readouterr())
    assert "Could not tell the outcome news of auth-service; the release goes on, unchanged" in log


def test_e_mail_goes_through_the_smtp_notifier_escaped(published):
    service = load_catalog().get(SERVICE)
    team = Team(emails=("identity-oncall@example.com",))
    ReleaseNotifier(service=SERVICE, event=OUTCOME).send(news(reason="<script>x</script>"), service, team, {})
    [mail] = published
    assert mail["email"] == ["identity-oncall@example.com"] and "&lt;script&gt;" in mail["html"]


def test_a_failed_task_keeps_the_first_line_of_its_error_and_never_raises():
    ti = FakeTaskInstance({}, {})
    record_failure({"ti": ti, "exception": RuntimeError(f"cannot reach {DSN}\nmore")})
    assert ti.pushed[FAILURE_KEY] == "cannot reach postgresql://***@127.0.0.1:5432/auth"

    class Broken:
        def xcom_push(self, key: str, value: Any) -> None:
            raise ConnectionError("supervisor gone")

    record_failure({"ti": Broken(), "exception": RuntimeError("x")})  # logged, not raised
    record_failure({"ti": ti})  # no exception in the context: nothing to keep


def test_release_callbacks_give_the_dag_its_outcome_and_two_tasks_their_news():
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    callbacks = release_callbacks(load_catalog().get(SERVICE))
    assert [n.event for n in callbacks.dag["on_success_callback"]] == [OUTCOME]
    assert callbacks.dag["on_failure_callback"] == callbacks.dag["on_success_callback"]
    assert callbacks.default_args == {"on_failure_callback": [record_failure]}
    assert [n.event for n in callbacks.preflight["on_success_callback"]] == [STARTED]
    # The human-in-the-loop operator takes notifiers and calls them once its request exists.
    approve_release = ApprovalOperator(task_id="approve_release", subject="Release?", **callbacks.approval)
    assert [n.event for n in approve_release.notifiers] == [AWAITING_APPROVAL]
    with pytest.raises(ValueError, match="event 'finished' is unknown; use one of started, awaiting_approval"):
        ReleaseNotifier(service=SERVICE, event="finished")


def test_every_release_dag_carries_its_notifications():
    from omnisphere_release.dags import build_dags

    catalog = load_catalog()
    for service in catalog.services:
        [dag] = build_dags(catalog, only=f"release_{service.name}")
        assert any(isinstance(cb, ReleaseNotifier) and cb.event == OUTCOME for cb in dag.on_failure_callback)
        assert any(isinstance(cb, ReleaseNotifier) and cb.event == OUTCOME for cb in dag.on_success_callback)
        assert all(record_failure in task.on_failure_callback for task in dag.tasks)
        assert [cb.event for cb in dag.get_task("preflight").on_success_callback] == [STARTED]
        assert [n.event for n in dag.get_task("approve_release").notifiers] == [AWAITING_APPROVAL]
