"""What counts as a lost database connection, and the bounded retry that survives one; and the AWS clients' retries.

The PostgreSQL errors are psycopg2's own classes, as a restarting server and a dead socket raise them; the AWS client
is a real boto3 client, through the Airflow connection, talking to a local HTTP server that can be told to fail.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from botocore.config import Config

from omnisphere_release.hooks.aws import RETRIES, retrying_config
from omnisphere_release.hooks.ecs import EcsDeploymentError, EcsDeploymentHook
from omnisphere_release.migrations import LockBusy, MigrationFailed
from omnisphere_release.transient import DatabaseUnreachable, connection_lost, retry_lost_connection

# --- connection_lost ------------------------------------------------------------------------------------------------


def wrapped(exc: BaseException) -> MigrationFailed:
    """A MigrationFailed raised from ``exc`` the way the engines raise theirs (``from None``: only __context__)."""
    try:
        try:
            raise exc
        except psycopg2.Error:
            raise MigrationFailed("001_init failed and was rolled back") from None
    except MigrationFailed as failed:
        return failed


@pytest.mark.parametrize("exc", [
    psycopg2.OperationalError("server closed the connection unexpectedly\n\tThis probably means the server "
                              "terminated abnormally"),
    psycopg2.OperationalError('connection to server at "127.0.0.1", port 5432 failed: Connection refused'),
    psycopg2.InterfaceError("connection already closed"),
    psycopg2.errors.AdminShutdown("terminating connection due to administrator command"),
    psycopg2.errors.CannotConnectNow("the database system is starting up"),
    psycopg2.errors.ConnectionFailure("connection failure"),
], ids=["closed", "refused", "interface", "admin-shutdown", "starting-up", "class-08"])
def test_a_lost_or_refused_connection_is_transient(exc):
    assert connection_lost(exc)
    assert connection_lost(wrapped(exc))  # also inside the engines' own exceptions


@pytest.mark.parametrize("exc", [
    psycopg2.errors.SyntaxError("syntax error at or near \"SELEC\""),
    psycopg2.errors.UniqueViolation("duplicate key value violates unique constraint"),
    psycopg2.errors.QueryCanceled("canceling statement due to statement timeout"),  # an OperationalError
    psycopg2.errors.LockNotAvailable("canceling statement due to lock timeout"),  # an OperationalError
    psycopg2.errors.DeadlockDetected("deadlock detected"),
    MigrationFailed("002_add_column failed: column already exists"),
    LockBusy("another migration run holds the lock"),
    RuntimeError("anything else"),
], ids=["syntax", "unique", "statement-timeout", "lock-timeout", "deadlock", "migration", "lock-busy", "other"])
def test_an_sql_error_is_not_transient(exc):
    assert not connection_lost(exc)
    if isinstance(exc, psycopg2.Error):
        assert not connection_lost(wrapped(exc))


# --- retry_lost_connection -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


LOST = psycopg2.OperationalError("server closed the connection unexpectedly")


def scripted(*outcomes: Any):
    """Work that raises or returns each of ``outcomes`` in turn, and counts its calls."""
    remaining = list(outcomes)
    calls = []

    def work() -> Any:
        calls.append(1)
        outcome = remaining.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    work.calls = calls  # type: ignore[attr-defined]
    return work


def test_work_that_loses_its_connection_runs_again_and_its_result_is_returned(caplog):
    clock = Clock()
    work = scripted(LOST, wrapped(LOST), "migrated")
    caplog.set_level(logging.INFO)

    result = retry_lost_connection(work, "schema migrations of auth-service up", logging.getLogger("t"),
                                   budget_seconds=60, sleep=clock.sleep, clock=clock.monotonic)

    assert result == "migrated"
    assert len(work.calls) == 3
    assert len(clock.slept) == 2 and 0.8 <= clock.slept[0] <= 1.2 and 1.6 <= clock.slept[1] <= 2.4  # backoff
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0].startswith("schema migrations of auth-service up: lost the connection to the database "
                                  "(server closed the connection unexpectedly); trying again in ")
    assert "What committed before the loss stays." in warnings[0]
    assert any("answered again after 2 lost connection(s)" in r.getMessage() for r in caplog.records)


def test_progress_between_losses_starts_the_budget_again():
    clock = Clock()
    batches = iter(range(100))
    done = [0]

    def work() -> str:
        clock.now += 15  # each attempt commits some batches, then loses its connection 15 s in
        done[0] = next(batches)
        if done[0] < 5:
            raise LOST
        return "done"

    # Five losses over 75+ s: more than the 20 s budget in all, but each one after progress.
    assert retry_lost_connection(work, "data migration", budget_seconds=20, progress=lambda: done[0],
                                 sleep=clock.sleep, clock=clock.monotonic) == "done"
    assert clock.slept and all(0.8 <= s <= 1.2 for s in clock.slept)  # the backoff starts again, too


def test_the_retry_gives_up_once_the_budget_is_spent_naming_what_and_how_long():
    clock = Clock()
    work = scripted(*[LOST] * 50)

    with pytest.raises(DatabaseUnreachable) as raised:
        retry_lost_connection(work, "integrity checks of auth-service", budget_seconds=20, sleep=clock.sleep,
                              clock=clock.monotonic)

    message = str(raised.value)
    assert message.startswith("integrity checks of auth-service: lost the connection to the database and could "
                              "not get it back within 20s (")
    assert message.endswith("server closed the connection unexpectedly")
    assert clock.now <= 20  # it never sleeps past the budget
    assert max(clock.slept) <= 12  # the delay is capped (10 s, jittered)
    assert isinstance(raised.value.__cause__, psycopg2.OperationalError)


@pytest.mark.parametrize("error", [psycopg2.errors.SyntaxError("syntax error"), MigrationFailed("bad SQL"),
                                   ValueError("a bug")])
def test_any_other_error_is_raised_at_once_without_a_retry(error):
    clock = Clock()
    work = scripted(error, "never reached")

    with pytest.raises(type(error)):
        retry_lost_connection(work, "x", sleep=clock.sleep, clock=clock.monotonic)

    assert len(work.calls) == 1 and clock.slept == []


# --- AWS clients retry transient errors --------------------------------------------------------------------------------

DEPLOYMENT_ARN = "arn:aws:ecs:eu-west-1:123456789012:service-deployment/omnisphere/auth-service/abc123"


class FaultyEcs:
    """A local ECS endpoint that answers the next ``faults`` requests with the given failures, then succeeds."""

    def __init__(self) -> None:
        self.faults: list[str] = []
        self.requests = 0
        faulty = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                faulty.requests += 1
                fault = faulty.faults.pop(0) if faulty.faults else None
                if fault == "drop":  # the connection closes without an answer
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "throttle":
                    self.answer(400, {"__type": "ThrottlingException", "message": "Rate exceeded"})
                elif fault == "503":
                    self.answer(503, {"__type": "ServiceUnavailableException", "message": "Service Unavailable"})
                elif fault == "denied":
                    self.answer(400, {"__type": "AccessDeniedException", "message": "not authorized"})
                else:
                    self.answer(200, {"serviceDeployments": [{"serviceDeploymentArn": DEPLOYMENT_ARN,
                                                              "status": "IN_PROGRESS"}], "failures": []})

            def answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def faulty_ecs(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyEcs]:
    endpoint = FaultyEcs()
    extra = {"endpoint_url": endpoint.url, "region_name": "eu-west-1"}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_FAULTY", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing", "extra": extra}))
    # No backoff in tests: the delays are botocore's business; what matters is which errors are retried.
    monkeypatch.setattr("botocore.retries.standard.ExponentialBackoff.delay_amount", lambda self, context: 0)
    yield endpoint
    endpoint.server.shutdown()


def test_ecs_calls_ride_out_throttling_5xx_and_dropped_connections(faulty_ecs):
    faulty_ecs.faults = ["throttle", "503", "drop", "throttle"]

    deployment = EcsDeploymentHook("aws_faulty").describe_deployment(DEPLOYMENT_ARN)

    assert deployment["status"] == "IN_PROGRESS"
    assert faulty_ecs.requests == 5  # four failures, retried by the client itself, then the answer


def test_transient_errors_are_retried_a_bounded_number_of_times(faulty_ecs):
    faulty_ecs.faults = ["503"] * 20

    with pytest.raises(EcsDeploymentError, match="ServiceUnavailable"):
        EcsDeploymentHook("aws_faulty").describe_deployment(DEPLOYMENT_ARN)

    assert faulty_ecs.requests == 1 + RETRIES["max_attempts"]  # botocore's max_attempts counts the retries


def test_an_error_that_will_not_heal_is_not_retried(faulty_ecs):
    faulty_ecs.faults = ["denied"]

    with pytest.raises(EcsDeploymentError, match="AccessDeniedException"):
        EcsDeploymentHook("aws_faulty").describe_deployment(DEPLOYMENT_ARN)

    assert faulty_ecs.requests == 1


def test_the_connections_own_retry_settings_win(faulty_ecs, monkeypatch):
    extra = {"endpoint_url": faulty_ecs.url, "region_name": "eu-west-1",
             "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 2}}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_FAULTY", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing", "extra": extra}))
    faulty_ecs.faults = ["503"] * 5

    with pytest.raises(EcsDeploymentError):
        EcsDeploymentHook("aws_faulty").describe_deployment(DEPLOYMENT_ARN)

    assert faulty_ecs.requests == 3


def test_retrying_config_keeps_every_option_the_connection_sets():
    merged = retrying_config(Config(read_timeout=5, retries={"mode": "adaptive", "max_attempts": 10}))
    assert merged.read_timeout == 5
    assert merged.retries == {"mode": "adaptive", "max_attempts": 10}
    assert merged.connect_timeout == 10  # the default the connection did not set

    assert retrying_config(None).retries == RETRIES
