"""omni-release refuses bad input before calling Airflow, and says what to set."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from omnisphere_release import client

REPO = Path(__file__).resolve().parents[2]


def test_missing_url_is_exit_4_with_what_to_set(monkeypatch, capsys):
    monkeypatch.delenv("OMNI_AIRFLOW_URL", raising=False)
    assert client.main(["status", "release_auth-service/run"]) == client.EXIT_UNREACHABLE
    assert "OMNI_AIRFLOW_URL" in capsys.readouterr().err


def test_unknown_option_is_bad_input():
    assert client.main(["trigger", "auth-service", "--image-tag", "1", "--colour", "red"], out=io.StringIO()) == 2


def test_unreachable_airflow_is_exit_4(monkeypatch, capsys):
    monkeypatch.setenv("OMNI_AIRFLOW_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("OMNI_AIRFLOW_USERNAME", "admin")
    monkeypatch.setenv("OMNI_AIRFLOW_PASSWORD", "x")
    assert client.main(["status", "release_auth-service/run"]) == client.EXIT_UNREACHABLE
    assert "cannot reach Airflow" in capsys.readouterr().err


def test_example_ci_workflow_uses_the_cli_with_secrets_from_the_environment():
    workflow = yaml.safe_load((REPO / "examples" / "ci" / "github-actions-release.yml").read_text())
    step = workflow["jobs"]["release"]["steps"][-1]
    assert "omni-release" in step["run"] and "--wait" in step["run"]
    assert set(step["env"]) == {"OMNI_AIRFLOW_URL", "OMNI_AIRFLOW_USERNAME", "OMNI_AIRFLOW_PASSWORD"}
    assert "PASSWORD" not in step["run"]


# ---- approval: a small stand-in for the few endpoints of Airflow's API v2 the approval commands use ----------------
class FakeAirflow:
    """Answers as Airflow 3.3's API does for one run of release_auth-service; records what the client sent."""

    def __init__(self) -> None:
        self.run_state = "running"
        self.tasks = {"preflight": "success", "approve_release": "awaiting_input", "backup": None}
        self.request: dict | None = {"subject": "Release auth-service 1.2.3 to production?", "response_received": False,
                                     "assigned_users": [{"id": "identity-lead", "name": "identity-lead"}]}
        self.patch_status, self.patch_detail = 200, ""
        self.after_answer = "success"  # approve_release's state once it took the answer
        self.report: dict = {}
        self.sent: list[tuple[str, str, dict]] = []

    def handle(self, method: str, path: str, body: dict) -> tuple[int, dict]:
        self.sent.append((method, path, body))
        run = "/api/v2/dags/release_auth-service/dagRuns"
        if path == "/auth/token":
            return 201, {"access_token": "token"}
        if method == "POST" and path == run:
            return 200, {"dag_run_id": "manual__1"}
        if path.endswith("/hitlDetails"):
            if method == "PATCH":
                if self.patch_status == 200:
                    self.request = {**(self.request or {}), "response_received": True}
                    self.tasks["approve_release"] = self.after_answer
                    if self.after_answer == "awaiting_input":  # the task refused it and asked again
                        self.request["response_received"] = False
                return self.patch_status, {"detail": self.patch_detail}
            return (200, self.request) if self.request else (404, {"detail": "Human-in-the-loop detail does not "
                                                                             "exist"})
        if path.endswith("/taskInstances"):
            return 200, {"task_instances": [{"task_id": t, "state": s} for t, s in self.tasks.items()]}
        if path.endswith("/report/xcomEntries/return_value"):
            return 200, {"value": self.report}
        if path == f"{run}/manual__1":
            return 200, {"state": self.run_state}
        return 404, {"detail": f"no route {method} {path}"}


@pytest.fixture()
def airflow(monkeypatch):
    fake = FakeAirflow()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            status, payload = fake.handle(self.command, self.path.split("?")[0], body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _answer  # noqa: N815 - the names http.server calls

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OMNI_AIRFLOW_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("OMNI_AIRFLOW_USERNAME", "identity-lead")
    monkeypatch.setenv("OMNI_AIRFLOW_PASSWORD", "x")
    monkeypatch.delenv("OMNI_AIRFLOW_TOKEN", raising=False)
    yield fake
    server.shutdown()


RUN = "release_auth-service/manual__1"


def test_trigger_sends_the_environment(airflow):
    assert client.main(["trigger", "auth-service", "--image-tag", "1.2.3", "--environment", "production"],
                       out=io.StringIO()) == client.EXIT_OK
    posted = [body for method, path, body in airflow.sent if method == "POST" and path.endswith("/dagRuns")]
    assert posted[0]["conf"] == {"image_tag": "1.2.3", "environment": "production"}


def test_status_of_a_release_awaiting_approval_shows_who_may_answer_and_where(airflow):
    out = io.StringIO()
    assert client.main(["status", RUN], out=out) == client.EXIT_OK
    text = out.getvalue()
    assert "awaiting approval by identity-lead" in text
    assert "/dags/release_auth-service/runs/manual__1/tasks/approve_release/required_actions" in text
    assert f"omni-release approve|reject {RUN}" in text


@pytest.mark.parametrize(("outcome", "code"), [("rejected", 5), ("approval_timed_out", 5), ("no_approver", 5),
                                                ("rolled_back", 1)])
def test_a_release_ended_at_approval_is_exit_5_and_a_rolled_back_one_exit_1(airflow, outcome, code):
    airflow.run_state, airflow.report = "failed", {"outcome": outcome}
    airflow.tasks["approve_release"] = "failed" if code == 5 else "success"
    assert client.main(["status", RUN], out=io.StringIO()) == code


def test_approve_answers_through_the_api_and_waits_until_the_task_took_it(airflow):
    out = io.StringIO()
    assert client.main(["approve", RUN, "--comment", "plan read"], out=out) == client.EXIT_OK
    patched = [body for method, _, body in airflow.sent if method == "PATCH"]
    assert patched == [{"chosen_options": ["Approve"], "params_input": {"comment": "plan read"}}]
    assert "Approved: the release goes on" in out.getvalue()


def test_reject_ends_the_release(airflow):
    airflow.after_answer = "failed"
    out = io.StringIO()
    assert client.main(["reject", RUN, "--comment", "not tonight"], out=out) == client.EXIT_OK
    assert [b["chosen_options"] for m, _, b in airflow.sent if m == "PATCH"] == [["Reject"]]
    assert "Rejected: the release ends here, with nothing changed" in out.getvalue()


def test_an_answer_airflow_refuses_is_exit_2_and_says_who_may_answer(airflow, capsys):
    airflow.patch_status, airflow.patch_detail = 403, "User=ci (id=ci) is not a respondent for the task."
    assert client.main(["approve", RUN], out=io.StringIO()) == client.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "User=ci (id=ci) is not a respondent" in err and "never the person who triggered" in err


def test_an_answer_the_task_refuses_is_exit_2(airflow, capsys):
    airflow.after_answer = "awaiting_input"
    assert client.main(["approve", RUN], out=io.StringIO()) == client.EXIT_BAD_INPUT
    assert "approve_release refused your answer" in capsys.readouterr().err


def test_answering_a_run_that_waits_for_no_approver_is_exit_2(airflow, capsys):
    airflow.request = None
    assert client.main(["reject", RUN], out=io.StringIO()) == client.EXIT_BAD_INPUT
    assert "not waiting for an approver" in capsys.readouterr().err
    assert not [m for m, _, _ in airflow.sent if m == "PATCH"]


def test_answering_a_request_that_is_over_is_exit_2_and_sends_nothing(airflow, capsys):
    airflow.tasks["approve_release"] = "failed"  # timed out: Airflow would record a late answer and do nothing
    assert client.main(["approve", RUN], out=io.StringIO()) == client.EXIT_BAD_INPUT
    assert "approve_release is failed" in capsys.readouterr().err
    assert not [m for m, _, _ in airflow.sent if m == "PATCH"]
