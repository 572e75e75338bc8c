"""Four eyes end to end on the devstack, with ``dag.test()``: a release in an environment whose catalog entry has
``approval: true`` waits at approve_release; a rejection or a timeout ends it with nothing changed and the run
FAILED; an answer from the person who triggered it, or from someone who is not an approver, is refused and the
request stays open; an approver's answer lets it go on, and the report says who approved and when.

The catalog here is a copy whose default environment (staging, on the devstack's resources) requires approval: the
rule is keyed on the environment's ``approval`` flag, so that is the rule production runs under. ``dag.test()``
triggers as ``dag_test``, so dag_test is one of auth-service's approvers here: the four-eyes rule, not the approvers
list, must be what refuses it.

``dag.test()`` leaves a human-in-the-loop task waiting until its response is recorded from outside: a thread answers
the way the REST API's PATCH .../hitlDetails does once the auth manager has let the user through (write the response,
resume the task), and the timeout is the scheduler's own sweep, called when the deadline has passed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import types
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from tests.e2e.helpers import RunOutcome, auth_service_at_version_3
from tests.e2e.test_release_dag import release, snapshot

pytestmark = pytest.mark.e2e
DAG_ID = "release_auth-service"
TASK_ID = "approve_release"
APPROVER = "release-manager"
UNCHANGED = ("schema", "version", "task_definition", "users")


def approval_catalog(path: Path, approvers: list[str], timeout_hours: float = 1) -> None:
    """Make the catalog copy at ``path`` require approval in its default environment (staging)."""
    catalog = yaml.safe_load(path.read_text())
    default = catalog["default_environment"]
    catalog["environments"][default].update({"approval": True, "approval_timeout_hours": timeout_hours})
    for service in catalog["services"]:
        if service["name"] == "auth-service":
            service["approvers"] = approvers
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))


@pytest.fixture()
def approval_env(devstack, airflow_db, sql_dir, tmp_path, monkeypatch):
    """auth-service at schema version 3, in a catalog whose default environment requires approval."""
    auth_service_at_version_3(tmp_path, monkeypatch)
    approval_catalog(tmp_path / "services.yaml", ["dag_test", APPROVER])
    return {"catalog": tmp_path / "services.yaml", "before": snapshot()}


# ---- answering from outside the run ----------------------------------------------------------------------------------
def waiting_request(since: datetime):
    """Return approve_release's task instance of the newest run, when it waits for an answer not yet given."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select
    from sqlalchemy.orm import joinedload

    with create_session() as session:
        ti = session.scalars(select(TaskInstance).options(joinedload(TaskInstance.hitl_detail)).where(
            TaskInstance.dag_id == DAG_ID, TaskInstance.task_id == TASK_ID,
            TaskInstance.state == TaskInstanceState.AWAITING_INPUT, TaskInstance.start_date >= since)).first()
        if ti is None or ti.hitl_detail is None or ti.hitl_detail.responded_at is not None:
            return None
        session.expunge(ti)
        return ti


def respond(user: str, option: str, comment: str, since: datetime) -> None:
    """Answer the waiting request as ``user``: what the API's PATCH does after its authorization check."""
    from airflow._shared.timezones import timezone as airflow_timezone
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import handle_event_submit
    from airflow.triggers.base import TriggerEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    ti = wait_for(lambda: waiting_request(since), f"{TASK_ID} to wait for an answer (for {user}'s {option})")
    with create_session() as session:
        locked = session.get(TaskInstance, ti.id)
        detail = session.scalar(select(HITLDetail).where(HITLDetail.ti_id == ti.id))
        detail.responded_by = {"id": user, "name": user}
        detail.responded_at = airflow_timezone.utcnow()
        detail.chosen_options = [option]
        detail.params_input = {"comment": comment}
        handle_event_submit(TriggerEvent(detail.as_resume_event_payload()), task_instance=locked, session=session)


def expire(since: datetime) -> None:
    """Wait until the request's deadline has passed, then run the scheduler's timeout sweep once."""
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    ti = wait_for(lambda: waiting_request(since), f"{TASK_ID} to wait for an answer")
    assert ti.trigger_timeout is not None, "the request has no deadline: the scheduler would never time it out"
    wait_for(lambda: datetime.now(timezone.utc) > ti.trigger_timeout, "the approval deadline to pass")
    SchedulerJobRunner.check_awaiting_input_timeouts(types.SimpleNamespace(log=logging.getLogger("sweep")))


def fail_waiting_request() -> None:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import update

    with create_session() as session:
        session.execute(update(TaskInstance).where(
            TaskInstance.dag_id == DAG_ID, TaskInstance.task_id == TASK_ID,
            TaskInstance.state == TaskInstanceState.AWAITING_INPUT).values(state=TaskInstanceState.FAILED))


def wait_for(found: Callable, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"waited {timeout:.0f}s for {what}")


@pytest.fixture()
def answers() -> Iterator[Callable[..., None]]:
    """Start a thread that gives the answers in order, each once approve_release waits for one; join it after."""
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []

    def start(*steps: tuple[str, str, str] | str | Callable[[], None]) -> None:
        # Import in this thread what both threads use: two threads importing Airflow's models at once deadlock.
        import airflow.dag_processing.dagbag  # noqa: F401
        import airflow.jobs.scheduler_job_runner  # noqa: F401
        import sqlalchemy.orm
        from airflow.models import import_all_models

        import_all_models()
        sqlalchemy.orm.configure_mappers()
        since = datetime.now(timezone.utc)

        def run() -> None:
            try:
                for step in steps:
                    if callable(step):  # something a person does meanwhile, once the request waits
                        wait_for(lambda: waiting_request(since), f"{TASK_ID} to wait for an answer")
                        step()
                    else:
                        expire(since) if step == "timeout" else respond(*step, since=since)  # type: ignore[misc]
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(exc)
                fail_waiting_request()  # else dag.test() would wait for an answer for ever

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]


def assert_nothing_changed(outcome: RunOutcome, before: dict, expected_outcome: str) -> dict:
    assert outcome.state == "failed", outcome.tasks  # a release that did not release is never green
    assert outcome.task(TASK_ID) == "failed", outcome.tasks
    for stage in ("backup", "schema_up", "integrity_check", "ecs_deploy", "smoke_test", "monitoring_gate", "finalize"):
        assert outcome.task(stage) == "upstream_failed", (stage, outcome.tasks)
    assert outcome.task("release_failed") == "failed" and outcome.task("report") == "success", outcome.tasks
    after = snapshot()
    for key in UNCHANGED:
        assert after[key] == before[key], key
    report = outcome.outputs["report"]
    assert report["outcome"] == expected_outcome
    assert report["backup"] is None and report["migrations_applied"] == []
    assert report["after"]["task_definition"] == before["task_definition"]
    # The rollback steps ran as they do after any refusal, and found nothing of this run to undo.
    for step, entry in report["rollback"].items():
        assert entry["state"] in ("success", "skipped"), (step, entry)
    return report


# ---- the tests -------------------------------------------------------------------------------------------------------
def test_a_rejection_ends_the_release_failed_with_nothing_changed(approval_env, answers):
    answers((APPROVER, "Reject", "not during the sales peak"))
    outcome = release()
    report = assert_nothing_changed(outcome, approval_env["before"], "rejected")
    approval = report["approval"]
    assert approval["required"] is True and approval["outcome"] == "rejected"
    assert (approval["rejected_by"], approval["comment"]) == (APPROVER, "not during the sales peak")
    assert approval["approved_by"] is None and approval["rejected_at"]
    assert report["audit"]["triggered_by"] == "dag_test" and report["audit"]["rejected_by"] == APPROVER
    assert report["summary"].startswith("REJECTED")


def test_the_triggering_user_and_a_non_approver_are_refused_and_an_approver_releases(approval_env, answers):
    answers(("dag_test", "Approve", "my own release"), ("mallory", "Reject", "not mine to say"),
            (APPROVER, "Approve", "plan read, lint clean"))
    outcome = release()
    assert outcome.state == "success", outcome.tasks
    assert outcome.task(TASK_ID) == "success" and outcome.task("finalize") == "success"
    assert snapshot()["version"] == 4
    report = outcome.outputs["report"]
    assert report["outcome"] == "released"
    approval = report["approval"]
    assert (approval["approved_by"], approval["comment"]) == (APPROVER, "plan read, lint clean")
    assert datetime.fromisoformat(approval["approved_at"]) <= datetime.now(timezone.utc)
    assert approval["approvers"] == [APPROVER]  # dag_test is an approver, but not of a run it triggered
    refused = approval["refused_answers"]
    assert [(r["by"], r["option"]) for r in refused] == [("dag_test", "Approve"), ("mallory", "Reject")]
    assert "triggered this run" in refused[0]["why"] and "is not an approver" in refused[1]["why"]
    audit = report["audit"]
    assert (audit["triggered_by"], audit["approved_by"]) == ("dag_test", APPROVER)
    assert (audit["window_forced_by"], audit["force_reason"]) == ("dag_test", "e2e test")


def hotfix_while_waiting(seen: dict) -> Callable[[], None]:
    """While the release waits for its approver: see that nothing holds the service, and deploy a hotfix (a new
    revision of the running task definition) as an on-call engineer would; keep what was seen in ``seen``."""
    def hotfix() -> None:
        import boto3
        import psycopg2

        from omnisphere_release.locks import ServiceLock

        seen["holder"] = ServiceLock("auth-service", lambda: psycopg2.connect(
            os.environ["OMNI_PG_DSN_AUTH_SERVICE"])).holder()
        ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        live = ecs.describe_services(cluster="omnisphere", services=["auth-service"])["services"][0]
        current = ecs.describe_task_definition(taskDefinition=live["taskDefinition"])["taskDefinition"]
        same = {k: current[k] for k in ("cpu", "memory", "networkMode", "requiresCompatibilities") if current.get(k)}
        arn = ecs.register_task_definition(family=current["family"], containerDefinitions=current[
            "containerDefinitions"], **same)["taskDefinition"]["taskDefinitionArn"]
        ecs.update_service(cluster="omnisphere", service="auth-service", taskDefinition=arn)
        seen["hotfix"] = arn

    return hotfix


def test_the_service_is_free_while_the_release_waits_and_a_hotfix_meanwhile_refuses_the_approved_plan(
        approval_env, answers, capfd):
    """An emergency rollback or a hotfix must not wait for an approver's answer; the approver approved the plan that
    preflight saw, so a service changed meanwhile refuses the release when approved, and nothing undoes the hotfix."""
    seen: dict = {}
    answers(hotfix_while_waiting(seen), (APPROVER, "Approve", "plan read"))
    outcome = release()
    assert seen["holder"] is None  # the waiting release held nothing
    report = assert_nothing_changed(outcome, approval_env["before"] | {"task_definition": seen["hotfix"]}, "refused")
    assert report["approval"]["outcome"] == "plan_changed" and report["approval"]["approved_by"] == APPROVER
    log = capfd.readouterr().out
    assert "auth-service changed while this release waited for its approval (it ran " \
           f"{approval_env['before']['task_definition']} and runs {seen['hotfix']} now" in log
    wait_for(lambda: not deploying("auth-service"), "the hotfix's deployment to finish", timeout=120)


def deploying(service: str) -> bool:
    import boto3

    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    live = ecs.describe_services(cluster="omnisphere", services=[service])["services"][0]
    return any(d.get("rolloutState") == "IN_PROGRESS" for d in live.get("deployments", []))


def test_no_answer_by_the_deadline_ends_the_release_failed_with_nothing_changed(approval_env, answers):
    approval_catalog(approval_env["catalog"], ["dag_test", APPROVER], timeout_hours=0.001)  # 3.6 s
    answers("timeout")
    outcome = release()
    report = assert_nothing_changed(outcome, approval_env["before"], "approval_timed_out")
    assert report["approval"]["outcome"] == "timed_out" and report["approval"]["approved_by"] is None
    assert report["summary"].startswith("APPROVAL TIMED OUT")


def test_a_service_whose_only_approver_triggered_it_is_refused_at_once(approval_env):
    approval_catalog(approval_env["catalog"], ["dag_test"])
    outcome = release()
    report = assert_nothing_changed(outcome, approval_env["before"], "no_approver")
    assert report["approval"]["outcome"] == "no_approver"


def test_an_environment_without_approval_passes_at_once(devstack, airflow_db, sql_dir, tmp_path, monkeypatch):
    auth_service_at_version_3(tmp_path, monkeypatch)
    outcome = release(dry_run=True)
    assert outcome.state == "success" and outcome.task(TASK_ID) == "success", outcome.tasks
    assert outcome.outputs[TASK_ID]["outcome"] == "not_required"
    assert outcome.outputs["report"]["approval"]["required"] is False


# ---- the rules alone, without a devstack -------------------------------------------------------------------------------
def test_who_may_answer_is_an_approver_who_did_not_trigger_the_run():
    from omnisphere_release.catalog import load_catalog
    from omnisphere_release.operators.approval import eligible_approvers, refusal_reason

    service = load_catalog().get("auth-service").model_copy(update={"approvers": ("release-manager", "identity-lead")})
    assert eligible_approvers(service, "release-manager") == ["identity-lead"]
    assert eligible_approvers(service, "ci-bot") == ["release-manager", "identity-lead"]
    assert refusal_reason("identity-lead", service, "release-manager") is None
    assert "triggered this run" in str(refusal_reason("release-manager", service, "release-manager"))
    why = str(refusal_reason("mallory", service, "release-manager"))
    assert "mallory is not an approver of auth-service" in why and "release-manager, identity-lead" in why
    assert "an unknown user" in str(refusal_reason(None, service, "release-manager"))


def test_the_report_says_who_decided_what():
    from omnisphere_release.report import build_report, render_markdown

    states = {"preflight": "success", "approve_release": "failed", "backup": "upstream_failed"}
    outputs = {"preflight": {"service": "auth-service", "dry_run": False, "window": {
                   "mode": "forced", "force_reason": "CVE-2026-1", "window_start": "2026-11-26T02:00:00+00:00"}},
               "approve_release": {"required": True, "outcome": "rejected", "rejected_by": "identity-lead",
                                   "rejected_at": "2026-11-26T02:05:00+00:00", "comment": "**not** tonight",
                                   "approvers": ["identity-lead"], "refused_answers": [
                                       {"by": "ci", "option": "Approve", "at": "2026-11-26T02:04:00+00:00",
                                        "why": "ci triggered this run"}]}}
    report = build_report(dag_id=DAG_ID, run_id="r1", triggered_by="ci", params={}, states=states, durations={},
                          outputs=outputs, after={}, stage_order=list(states))
    assert report["outcome"] == "rejected" and report["summary"].startswith("REJECTED")
    assert report["approval"]["rejected_by"] == "identity-lead" and report["approval"]["approved_by"] is None
    assert report["audit"] == {"triggered_by": "ci", "approved_by": None, "approved_at": None,
                               "rejected_by": "identity-lead", "rejected_at": "2026-11-26T02:05:00+00:00",
                               "window_forced_by": "ci", "force_reason": "CVE-2026-1",
                               "refused_answers": outputs["approve_release"]["refused_answers"]}
    markdown = render_markdown(report)
    assert "- Approval: REJECTED by identity\\-lead at 2026-11-26T02:05:00+00:00 (\\*\\*not\\*\\* tonight)" in markdown
    assert "refused the Approve of ci (ci triggered this run)" in markdown
    assert "(forced by ci)" in markdown
    timed_out = build_report(dag_id=DAG_ID, run_id="r2", triggered_by="ci", params={}, states=states, durations={},
                             outputs={**outputs, "approve_release": {"required": True, "outcome": "timed_out"}},
                             after={}, stage_order=list(states))
    assert timed_out["outcome"] == "approval_timed_out"
    staging = build_report(dag_id=DAG_ID, run_id="r3", triggered_by="ci", params={},
                           states={"preflight": "success", "approve_release": "success", "finalize": "success"},
                           durations={}, outputs={"preflight": outputs["preflight"], "approve_release": {
                               "required": False, "outcome": "not_required"}}, after={}, stage_order=[])
    assert staging["outcome"] == "released" and staging["approval"]["required"] is False
    assert "- Approval: not required" in render_markdown(staging)
