"""Release news end to end on the devstack: what auth-service's team (identity) reads on its SNS topic, through an SQS
queue subscribed to it, for a good release, a rolled-back one, one whose rollback is incomplete, one that waits for an
approver and is rejected, and that a channel that fails (a topic that does not exist, the AWS endpoint down) leaves
the release's outcome as it was.

The DAG callbacks that tell the outcome run in the DAG processor in production; ``run_dag`` runs them the same way
(helpers.dag_processor).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.e2e.helpers import RunOutcome, auth_service_at_version_3, push_image, run_dag
from tests.e2e.test_approval import answers, approval_catalog  # noqa: F401 - answers is a fixture

# Several whole releases each: in `make test-long` (CI runs it after `make test`), not in `make test`.
pytestmark = [pytest.mark.e2e, pytest.mark.long]
SERVICE = "auth-service"
TEAM = "identity"
NOW = {"bake_minutes": 0.1, "reason": "e2e notifications", "window": "now", "force_reason": "e2e test"}
READ_DEADLINE_SECONDS = 20.0


@pytest.fixture()
def team_queue(devstack, airflow_db, sql_dir, tmp_path, monkeypatch) -> Iterator[dict[str, Any]]:
    """auth-service at schema version 3; the catalog's topic of each team created in the devstack; an SQS queue of
    this test's own subscribed to the identity team's topic. Yields the queue's URL and the topics."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    sns, sqs = boto3.client("sns", endpoint_url=endpoint), boto3.client("sqs", endpoint_url=endpoint)
    auth_service_at_version_3(tmp_path, monkeypatch)
    catalog = yaml.safe_load(Path(os.environ["OMNISPHERE_CATALOG"]).read_text())
    topics = {}
    for team, channels in catalog["teams"].items():
        for arn in channels["sns_topics"]:  # create_topic is idempotent: the same name gives the same ARN
            assert sns.create_topic(Name=arn.rsplit(":", 1)[1])["TopicArn"] == arn
        topics[team] = channels["sns_topics"][0]
    queue_url = sqs.create_queue(QueueName=f"omni-news-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    subscription = sns.subscribe(TopicArn=topics[TEAM], Protocol="sqs", Endpoint=queue_arn)["SubscriptionArn"]
    try:
        yield {"queue_url": queue_url, "topics": topics, "catalog": catalog}
    finally:
        sns.unsubscribe(SubscriptionArn=subscription)
        sqs.delete_queue(QueueUrl=queue_url)


def use_catalog(catalog: dict, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "services-news.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    monkeypatch.setenv("OMNISPHERE_CATALOG", str(path))


def release(tag_suffix: str = "", **conf: Any) -> RunOutcome:
    tag = f"2.{uuid.uuid4().hex[:6]}{tag_suffix}"
    push_image(SERVICE, tag)
    return run_dag(f"release_{SERVICE}", {"image_tag": tag, **NOW, **conf})


def read_news(queue_url: str, count: int, seconds: float = READ_DEADLINE_SECONDS) -> list[dict[str, Any]]:
    """Read up to ``count`` messages from the queue, for at most ``seconds`` (SNS's JSON envelope: Subject, Message,
    MessageAttributes)."""
    sqs = boto3.client("sqs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    news: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while len(news) < count and time.monotonic() < deadline:
        for message in sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                           WaitTimeSeconds=1).get("Messages", []):
            news.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return news


def by_event(news: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n["MessageAttributes"]["outcome"]["Value"]: n for n in news}


def assert_no_secret(text: str) -> None:
    """No credential of the devstack, and no DSN, in a message."""
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    for name, value in os.environ.items():
        if name.startswith("OMNI_PG_DSN_") or name == "OMNI_PG_ADMIN_DSN":
            from urllib.parse import urlsplit

            secrets += [value] + ([urlsplit(value).password] if urlsplit(value).password else [])
    for secret in secrets:
        assert secret not in text
    assert "postgresql://" not in text and "postgres://" not in text


def test_a_good_release_tells_started_then_released(team_queue):
    outcome = release()
    assert outcome.state == "success", outcome.tasks
    assert outcome.outputs["report"]["outcome"] == "released"
    news = by_event(read_news(team_queue["queue_url"], 2))
    assert sorted(news) == ["released", "started"]
    plan, tag = outcome.outputs["preflight"], outcome.outputs["preflight"]["image_tag"]
    for message in news.values():
        body = message["Message"]
        assert message["Subject"].startswith(f"[OmniSphere] {SERVICE} (staging): ") and tag in message["Subject"]
        assert f"Release of {SERVICE} to staging" in body
        assert f"Image: {plan['previous_image']} -> {plan['target_image']}" in body
        assert f"/dags/release_{SERVICE}/runs/" in body and outcome.run_id.split("+")[0].replace(":", "%3A") in body
        assert "Triggered by: dag_test" in body
        assert message["MessageAttributes"]["environment"]["Value"] == "staging"
        assert_no_secret(json.dumps(message))
    assert news["released"]["Message"].startswith(f"Release of {SERVICE} to staging: RELEASED")
    assert "Failed stage" not in news["released"]["Message"]


def test_a_rolled_back_release_names_the_failing_stage_and_its_cause(team_queue, monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_OMNI_BACKUP_BUCKET", "omnisphere-backups-local-unwritable")
    outcome = release()
    assert outcome.state == "failed" and outcome.task("backup") == "failed", outcome.tasks
    assert outcome.outputs["report"]["outcome"] == "rolled_back"
    news = by_event(read_news(team_queue["queue_url"], 2))
    assert sorted(news) == ["rolled_back", "started"]
    body = news["rolled_back"]["Message"]
    assert "FAILED and ROLLED BACK" in body and "FAILED" in news["rolled_back"]["Subject"]
    failed_line = next(line for line in body.splitlines() if line.startswith("Failed stage: backup: "))
    assert "omnisphere-backups-local-unwritable" in failed_line, body
    assert "Rollback step failed" not in body
    assert_no_secret(json.dumps(news))


def test_an_incomplete_rollback_asks_a_person_to_act(team_queue, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from omnisphere_release.operators.finalize import VerifyRollbackOperator

    verify = VerifyRollbackOperator.execute

    def verify_then_find_a_difference(self, context):  # the rollback really ran: the devstack stays as before
        verify(self, context)
        raise AirflowFailException("ECS service auth-service still runs a task of the released revision\nmore")

    monkeypatch.setattr(VerifyRollbackOperator, "execute", verify_then_find_a_difference)
    monkeypatch.setenv("AIRFLOW_VAR_OMNI_BACKUP_BUCKET", "omnisphere-backups-local-unwritable")
    outcome = release()
    assert outcome.state == "failed" and outcome.task("verify_rollback") == "failed", outcome.tasks
    assert outcome.outputs["report"]["outcome"] == "rollback_incomplete"
    news = by_event(read_news(team_queue["queue_url"], 2))
    assert sorted(news) == ["rollback_incomplete", "started"]
    body = news["rollback_incomplete"]["Message"]
    assert "ROLLBACK INCOMPLETE: a person must act" in body and "ACTION NEEDED" in body
    assert "Failed stage: backup: " in body
    assert ("Rollback step failed: verify_rollback: ECS service auth-service still runs a task of the released "
            "revision\n") in body


def test_a_release_awaiting_approval_tells_its_approvers_then_its_rejection(team_queue, answers):  # noqa: F811
    approval_catalog(Path(os.environ["OMNISPHERE_CATALOG"]), ["dag_test", "release-manager"])
    answers(("release-manager", "Reject", "not during the sales peak"))
    outcome = release()
    assert outcome.state == "failed" and outcome.task("approve_release") == "failed", outcome.tasks
    assert outcome.outputs["report"]["outcome"] == "rejected"
    news = by_event(read_news(team_queue["queue_url"], 3))
    assert sorted(news) == ["awaiting_approval", "rejected", "started"]
    waiting = news["awaiting_approval"]["Message"]
    assert waiting.startswith(f"Release of {SERVICE} to staging: AWAITING APPROVAL")
    assert "Approvers: dag_test, release-manager (never the person who triggered the run)" in waiting
    assert "AWAITING APPROVAL" in news["awaiting_approval"]["Subject"]
    rejected = news["rejected"]["Message"]
    assert "REJECTED at approval: nothing was changed" in rejected and "Rejected by: release-manager" in rejected
    assert "Failed stage: approve_release: Rejected by release-manager" in rejected


def test_a_topic_that_does_not_exist_is_logged_and_changes_nothing(team_queue, tmp_path, monkeypatch, capfd):
    catalog = team_queue["catalog"]
    missing = "arn:aws:sns:eu-west-1:123456789012:omnisphere-identity-gone"
    catalog["teams"][TEAM]["sns_topics"] = [missing, team_queue["topics"][TEAM]]
    use_catalog(catalog, tmp_path, monkeypatch)
    outcome = release()
    assert outcome.state == "success", outcome.tasks
    assert outcome.outputs["report"]["outcome"] == "released"
    assert sorted(by_event(read_news(team_queue["queue_url"], 2))) == ["released", "started"]  # the other topic
    log = "".join(capfd.readouterr())
    assert f"Could not send the released news of {SERVICE} (staging) to sns {missing}" in log
    assert "reached 1 of 2 channels" in log


def test_an_sns_outage_at_the_end_of_a_release_is_logged_and_changes_nothing(team_queue, monkeypatch, capfd):
    from devstack import faults
    from omnisphere_release.operators.report import ReleaseReportOperator

    state_dir = os.environ["OMNI_DEVSTACK_DIR"]
    report = ReleaseReportOperator.execute

    def report_then_lose_aws(self, context):  # the outcome is told after the report: into the outage
        result = report(self, context)
        faults.set_aws_faults(state_dir, outage_seconds=60)
        return result

    monkeypatch.setattr(ReleaseReportOperator, "execute", report_then_lose_aws)
    try:
        outcome = release()
    finally:
        faults.clear_aws_faults(state_dir)
    assert outcome.state == "success", outcome.tasks
    assert outcome.outputs["report"]["outcome"] == "released"
    assert sorted(by_event(read_news(team_queue["queue_url"], 2, seconds=5))) == ["started"]  # sent before the outage
    log = "".join(capfd.readouterr())
    assert f"Could not send the released news of {SERVICE} (staging) to sns {team_queue['topics'][TEAM]}" in log
    assert "the release's outcome is unchanged" in log and f"Release of {SERVICE} to staging: RELEASED" in log
