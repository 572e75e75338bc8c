"""The command lines' lease, without a database: who is a command line's holder and how the refusal reads, which
actions take the lease (every change; no read, plan or dry run), that `all` takes each service's lease around that
service's work alone, and how a command asks Airflow about an Airflow holder."""

from __future__ import annotations

import getpass
import os
import socket
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest

import omnisphere_release.datamigrate.__main__ as datamigrate_cli
import omnisphere_release.migrations.__main__ as migrate_cli
from omnisphere_release import client
from omnisphere_release.locks import Holder, ServiceBusy, airflow_run_is_over_from_env, cli_holder

SINCE = datetime(2026, 11, 26, 21, 0, tzinfo=UTC)
RELEASE = Holder("release_auth-service", "manual__2026-11-26T20:00:00+00:00", "ecs_deploy", "release of auth-service",
                 SINCE)
COMMAND = Holder("omni-migrate", "cli:alice@ops-box:4242:31337", "down", "omni-migrate auth-service down: OPS-1",
                 SINCE)


# ---- the holder ---------------------------------------------------------------------------------------------------
def test_a_command_lines_holder_is_recognised_only_by_its_tool_and_run_id_shape():
    assert COMMAND.is_cli and COMMAND.backend_pid == 31337
    assert not RELEASE.is_cli and RELEASE.backend_pid is None
    assert not Holder("release_auth-service", "cli:alice@ops-box:4242:31337", "t", "o").is_cli  # a DAG's run id
    assert not Holder("omni-migrate", "manual__x", "t", "o").is_cli
    assert not Holder("omni-migrate", "cli:alice@ops-box:4242", "t", "o").is_cli  # no backend pid
    mine = cli_holder("omni-datamigrate", "run", "data migration x", 777)
    assert mine.run_id == f"cli:{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}:777"
    assert mine.is_cli and mine.backend_pid == 777 and (mine.dag_id, mine.task_id) == ("omni-datamigrate", "run")
    with pytest.raises(ValueError, match="tool must be one of omni-migrate, omni-datamigrate"):
        cli_holder("omni-release", "up", "x", 1)


def test_the_refusal_names_the_holder_and_how_its_lease_ends():
    airflow = str(ServiceBusy("auth-service", RELEASE))
    assert airflow == ("auth-service is held by release of auth-service (run manual__2026-11-26T20:00:00+00:00 of "
                       "release_auth-service, task ecs_deploy since 2026-11-26T21:00:00+00:00): one operation per "
                       "service at a time. Wait for that run to end, or fail it in Airflow if it is stuck; its lease "
                       "ends with it.")
    command = str(ServiceBusy("auth-service", COMMAND, note="(a note)"))
    assert command == ("auth-service is held by omni-migrate auth-service down: OPS-1 (omni-migrate down run by "
                       "alice@ops-box, process 4242, PostgreSQL session 31337 since 2026-11-26T21:00:00+00:00): one "
                       "operation per service at a time. Wait for that command to end, or stop it (process 4242 on "
                       "alice@ops-box); its lease ends with its PostgreSQL session (if its host is gone: SELECT "
                       "pg_terminate_backend(31337) on the service database). (a note)")


# ---- asking Airflow about an Airflow holder -------------------------------------------------------------------------
class FakeApi:
    answers: dict[str, object] = {}

    def __init__(self, url, token=None, username=None, password=None, timeout=30.0):
        assert (url, token) == ("https://airflow.example", "t0ken")

    def run(self, dag_id, run_id):
        answer = self.answers[run_id]
        if isinstance(answer, Exception):
            raise answer
        return {"dag_id": dag_id, "dag_run_id": run_id, "state": answer}


@pytest.mark.parametrize(("answer", "over"), [
    ("success", True), ("failed", True), ("running", False), ("queued", False),
    (client.ClientError("Airflow refused GET ... (HTTP 404): not found", 2), None),  # a wrong URL answers 404 too
    (client.ClientError("cannot reach Airflow", 4), None),
])
def test_a_command_asks_airflow_through_omni_releases_settings(monkeypatch, answer, over):
    monkeypatch.setenv("OMNI_AIRFLOW_URL", "https://airflow.example")
    monkeypatch.setenv("OMNI_AIRFLOW_TOKEN", "t0ken")
    monkeypatch.setattr(client, "AirflowApi", FakeApi)
    FakeApi.answers = {RELEASE.run_id: answer}
    assert airflow_run_is_over_from_env(RELEASE) is over


def test_without_airflow_settings_a_command_cannot_tell(monkeypatch):
    for name in ("OMNI_AIRFLOW_URL", "AIRFLOW_HOME", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
        monkeypatch.delenv(name, raising=False)
    assert airflow_run_is_over_from_env(RELEASE) is None


@pytest.mark.parametrize(("state", "over"), [("success", True), ("failed", True), ("running", False), (None, None)])
def test_on_an_airflow_host_a_command_reads_the_run_state_from_the_metadata_database(monkeypatch, state, over):
    import omnisphere_release.locks as locks

    monkeypatch.delenv("OMNI_AIRFLOW_URL", raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", "/nonexistent/airflow-home")
    asked: list[Holder] = []

    def read(holder: Holder) -> str | None:
        asked.append(holder)
        return state

    monkeypatch.setattr(locks, "_run_state_from_metadata", read)
    assert airflow_run_is_over_from_env(RELEASE) is over and asked == [RELEASE]


# ---- which actions take the lease -----------------------------------------------------------------------------------
class FakeEngine:
    def __init__(self, service, events):
        self.service, self.events = service, events

    def __getattr__(self, action):
        def act(*args, **kwargs):
            self.events.append(("work", self.service, action))
            return self

        return act

    def summary(self):
        return f"{self.service}: done"

    def render(self):
        return f"{self.service}: plan"

    blocking: list = []


@pytest.fixture()
def events(monkeypatch):
    """Run omni-migrate with a fake engine and a fake lease that record what happens, in order."""
    recorded: list[tuple] = []

    @contextmanager
    def lease(service, connect, tool, action, operation, airflow_run_is_over=None):
        assert tool == "omni-migrate" and airflow_run_is_over is migrate_cli.airflow_run_is_over_from_env
        recorded.append(("take", service, action))
        if service in busy:
            raise ServiceBusy(service, RELEASE)
        try:
            yield None
        finally:
            recorded.append(("give up", service, action))

    busy: set[str] = set()
    monkeypatch.setattr(migrate_cli, "cli_lease", lease)
    monkeypatch.setattr(migrate_cli, "engine_for", lambda service, catalog: FakeEngine(service.name, recorded))
    monkeypatch.setattr(migrate_cli, "connect_to", lambda service: object)
    recorded_busy = busy
    yield recorded, recorded_busy


@pytest.mark.parametrize(("argv", "takes"), [
    (["up", "--reason", "r"], True),
    (["down", "--to", "2", "--reason", "r"], True),
    (["down", "--all", "--reason", "r"], True),
    (["resolve", "--version", "4", "--as", "applied", "--reason", "r"], True),
    (["baseline", "--version", "3", "--reason", "r"], True),
    (["adopt", "--reason", "r"], True),
    (["up", "--dry-run"], False),
    (["down", "--dry-run"], False),
    (["baseline", "--version", "3", "--dry-run"], False),
    (["adopt", "--dry-run"], False),
    (["plan"], False),
    (["plan", "--direction", "down"], False),
    (["status"], False),
])
def test_every_change_takes_the_lease_around_its_work_and_nothing_else_does(events, argv, takes):
    recorded, _ = events
    assert migrate_cli.main(["auth-service", *argv]) == 0
    action = argv[0]
    work = [e for e in recorded if e[0] == "work"]
    assert len(work) == 1
    if takes:
        assert recorded == [("take", "auth-service", action), work[0], ("give up", "auth-service", action)]
    else:
        assert recorded == work


def test_all_takes_each_services_lease_around_that_services_work_alone(events):
    recorded, _ = events
    assert migrate_cli.main(["all", "down", "--reason", "r"]) == 0
    services = [e[1] for e in recorded if e[0] == "take"]
    assert len(services) == 3 and services[-1] == "auth-service"  # down: the reverse of the release order
    expected = []
    for service in services:
        expected += [("take", service, "down"), ("work", service, "migrate"), ("give up", service, "down")]
    assert recorded == expected


def test_all_stops_at_a_held_service_naming_it_and_what_was_done_before(events, capsys):
    recorded, busy = events
    assert migrate_cli.main(["all", "up", "--reason", "r"]) == 0
    order = [e[1] for e in recorded if e[0] == "take"]
    recorded.clear()
    busy.add(order[1])
    assert migrate_cli.main(["all", "up", "--reason", "r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refused: {order[1]} is held by release of auth-service")
    assert err.rstrip().endswith(f"Nothing of {order[1]} was changed ({order[0]} done before it).")
    assert ("work", order[1], "migrate") not in recorded and ("take", order[2], "up") not in recorded


def test_a_refused_lease_is_exit_2_and_ctrl_c_is_exit_1(events, capsys, monkeypatch):
    recorded, busy = events
    busy.add("auth-service")
    assert migrate_cli.main(["auth-service", "down", "--reason", "r"]) == 2
    assert not [e for e in recorded if e[0] == "work"]

    busy.clear()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FakeEngine, "migrate", interrupted, raising=False)
    assert migrate_cli.main(["auth-service", "down", "--reason", "r"]) == 1
    assert "interrupted: " in capsys.readouterr().err
    assert recorded[-1] == ("give up", "auth-service", "down")  # given up on the way out


def test_below_baseline_goes_with_down_and_a_reason(events, capsys):
    for argv in (["up", "--below-baseline", "x", "--reason", "r"], ["down", "--below-baseline", "  ", "--reason", "r"],
                 ["plan", "--below-baseline", "x"]):
        assert migrate_cli.main(["auth-service", *argv]) == 2
        assert "--below-baseline goes with down" in capsys.readouterr().err


# ---- the data migration CLI -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("action", "takes"), [("run", True), ("revert", True), ("pause", False), ("status", False)])
def test_data_migration_run_and_revert_take_the_lease_and_pause_and_status_do_not(monkeypatch, capsys, action,
                                                                                  takes):
    recorded: list[tuple] = []

    @contextmanager
    def lease(service, connect, tool, lease_action, operation, airflow_run_is_over=None):
        assert tool == "omni-datamigrate"
        recorded.append(("take", service, lease_action))
        yield None
        recorded.append(("give up", service, lease_action))

    class Result:
        name, direction, state, rows, batches, seconds = "backfill", "forward", "done", 0, 0, 0.0

    class Engine:
        def __init__(self, *args, **kwargs):
            pass

        def run(self, *args, **kwargs):
            recorded.append(("work", "run"))
            return Result()

        def status(self):
            recorded.append(("work", "status"))

        def request_pause(self):
            recorded.append(("work", "pause"))

    monkeypatch.setattr(datamigrate_cli, "cli_lease", lease)
    monkeypatch.setattr(datamigrate_cli, "DataMigrationEngine", Engine)
    monkeypatch.setenv("OMNI_PG_DSN_BILLING_SERVICE", "postgresql://nobody@127.0.0.1:1/none")
    argv = ["billing-service", "backfill_invoice_due_dates", action] + (["--reason", "r"] if takes else [])
    assert datamigrate_cli.main(argv) == 0, capsys.readouterr().err
    work = [e for e in recorded if e[0] == "work"]
    assert recorded == ([("take", "billing-service", action), *work, ("give up", "billing-service", action)]
                        if takes else work)
