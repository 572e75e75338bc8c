"""The command lines take the service's lease, on a real PostgreSQL: omni-migrate and the data migration CLI are
refused (exit 2, nothing changed) while an Airflow run or another command holds the service, hold it while they
change it, give it up at the end (also on an error or Ctrl-C), and a dead command's lease is taken over, by another
command and by an Airflow task alike, without asking Airflow about a run that does not exist."""

from __future__ import annotations

import getpass
import os
import socket

import psycopg2
import pytest

from omnisphere_release.datamigrate.__main__ import main as datamigrate
from omnisphere_release.locks import (
    Holder,
    ServiceBusy,
    ServiceLock,
    cli_holder,
    cli_holder_is_over,
    cli_lease,
)
from omnisphere_release.migrations.__main__ import main as migrate
from omnisphere_release.migrations.engine import MigrationEngine

pytestmark = pytest.mark.integration
SERVICE = "auth-service"
RELEASE = Holder("release_auth-service", "manual__2026-11-26T20:00:00+00:00", "ecs_deploy", "release of auth-service")


def query(dsn: str, sql: str, params=None):
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else None


def schema(dsn: str) -> list[tuple]:
    """The tables and columns of the service (the engine's own tables aside), and the applied versions."""
    return query(dsn, "SELECT table_name, column_name, data_type FROM information_schema.columns "
                      "WHERE table_schema = 'public' AND table_name NOT LIKE 'omnisphere_%' ORDER BY 1, 2") + \
        query(dsn, "SELECT version, state FROM omnisphere_schema_history ORDER BY version")


def lock_of(dsn: str, service: str = SERVICE) -> ServiceLock:
    return ServiceLock(service, lambda: psycopg2.connect(dsn))


def wait_gone(dsn: str, backend: int) -> None:
    """Wait until a closed session's backend has left pg_stat_activity (it exits just after the client closes)."""
    import time

    deadline = time.monotonic() + 30
    while query(dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", [backend]):
        assert time.monotonic() < deadline, f"backend {backend} still there"
        time.sleep(0.05)


@pytest.fixture()
def service_db(scratch_database, sql_dir, monkeypatch, capsys):
    """auth-service at its newest version in a scratch database, through omni-migrate; no Airflow to ask."""
    monkeypatch.setenv("OMNI_PG_DSN_AUTH_SERVICE", scratch_database)
    monkeypatch.delenv("OMNI_AIRFLOW_URL", raising=False)
    assert migrate([SERVICE, "up", "--reason", "test: install"]) == 0
    assert lock_of(scratch_database).holder() is None  # given up at the end
    capsys.readouterr()
    return scratch_database


# ---- refused while held -----------------------------------------------------------------------------------------
def test_down_is_refused_while_an_airflow_run_holds_the_service_and_changes_nothing(service_db, capsys):
    lock_of(service_db).acquire(RELEASE, is_over=lambda _: False)
    before = schema(service_db)
    log_rows = query(service_db, "SELECT count(*) FROM omnisphere_schema_log")

    assert migrate([SERVICE, "down", "--reason", "test: while a release runs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refused: auth-service is held by release of auth-service (run "
                          "manual__2026-11-26T20:00:00+00:00 of release_auth-service, task ecs_deploy since "), err
    assert "Wait for that run to end" in err and "could not ask Airflow" in err and "OMNI_AIRFLOW_URL" in err
    assert "Nothing of auth-service was changed" in err
    assert schema(service_db) == before
    assert query(service_db, "SELECT count(*) FROM omnisphere_schema_log") == log_rows
    held = lock_of(service_db).holder()
    assert held is not None and held.same_run(RELEASE)  # the release keeps its lease


def test_every_change_action_is_refused_while_held_and_reads_are_not(service_db, capsys):
    lock_of(service_db).acquire(RELEASE, is_over=lambda _: False)
    for argv in ([SERVICE, "up", "--reason", "x"], [SERVICE, "down", "--to", "2", "--reason", "x"],
                 [SERVICE, "resolve", "--version", "4", "--as", "applied", "--reason", "x"],
                 [SERVICE, "baseline", "--version", "4", "--reason", "x"],
                 [SERVICE, "adopt", "--reason", "x"], ["all", "up", "--reason", "x"]):
        assert migrate(argv) == 2, argv
        assert "is held by release of auth-service" in capsys.readouterr().err, argv
    for argv in ([SERVICE, "status"], [SERVICE, "plan", "--direction", "down"],
                 [SERVICE, "down", "--dry-run"], [SERVICE, "adopt", "--dry-run", "--reason", "x"]):
        code = migrate(argv)
        assert "is held by" not in capsys.readouterr().err, argv
        assert code in (0, 2), argv  # adopt --dry-run: refused for want of golang-migrate's table, not for the lease


def test_a_live_command_holds_it_against_another_command_and_an_airflow_task(service_db, capsys):
    with cli_lease(SERVICE, lambda: psycopg2.connect(service_db), "omni-migrate", "down", "by hand") as taken:
        mine = taken.holder
        assert mine.is_cli and mine.dag_id == "omni-migrate" and mine.task_id == "down"
        assert mine.run_id.startswith(f"cli:{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}:")
        assert lock_of(service_db).holder() == mine

        before = schema(service_db)
        assert migrate([SERVICE, "down", "--reason", "test: second command"]) == 2
        err = capsys.readouterr().err
        assert f"is held by by hand (omni-migrate down run by {getpass.getuser()}@{socket.gethostname()}, " \
               f"process {os.getpid()}, PostgreSQL session {mine.backend_pid} since " in err, err
        assert f"pg_terminate_backend({mine.backend_pid})" in err
        assert schema(service_db) == before

        def never(holder: Holder) -> bool:
            raise AssertionError(f"asked Airflow about {holder}")  # a command's lease is judged by its session

        with pytest.raises(ServiceBusy, match=r"omni-migrate down run by .*Wait for that command to end"):
            lock_of(service_db).acquire(RELEASE, is_over=never)
    assert lock_of(service_db).holder() is None


# ---- held while changing, given up at the end -----------------------------------------------------------------------
def test_the_lease_is_held_during_the_change_and_given_up_after_success_failure_and_ctrl_c(service_db, monkeypatch,
                                                                                           capsys):
    seen: list[Holder | None] = []
    alive: list[bool] = []
    original = MigrationEngine.migrate

    def observed(self, *args, **kwargs):
        holder = lock_of(service_db).holder()
        seen.append(holder)
        alive.append(bool(holder and query(service_db, "SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                           [holder.backend_pid])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MigrationEngine, "migrate", observed)
    assert migrate([SERVICE, "down", "--reason", "test: observed"]) == 0
    assert seen[0] is not None and seen[0].is_cli and seen[0].operation.endswith("down: test: observed")
    assert alive == [True]  # the session that holds it stays open while the command works
    assert lock_of(service_db).holder() is None

    assert migrate([SERVICE, "up", "--to", "1", "--reason", "test: bad target"]) == 2  # refused inside the lease
    assert lock_of(service_db).holder() is None

    def interrupted(self, *args, **kwargs):
        seen.append(lock_of(service_db).holder())
        raise KeyboardInterrupt

    monkeypatch.setattr(MigrationEngine, "migrate", interrupted)
    assert migrate([SERVICE, "up", "--reason", "test: ctrl-c"]) == 1
    assert "interrupted" in capsys.readouterr().err and seen[-1] is not None and seen[-1].is_cli
    assert lock_of(service_db).holder() is None


# ---- a dead command never blocks the service ------------------------------------------------------------------------
def dead_cli_lease(dsn: str) -> Holder:
    """Take the lease as a command would, then let that command die: its session ends, the row stays."""
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (backend,) = cur.fetchall()[0]
    taken = lock_of(dsn).acquire_on(conn, cli_holder("omni-migrate", "up", "a killed command", backend),
                                    is_over=lambda _: False)
    conn.close()
    wait_gone(dsn, backend)
    assert lock_of(dsn).holder() == taken.holder
    return taken.holder


def test_a_dead_commands_lease_is_taken_over_by_the_next_command(service_db, capsys):
    dead_cli_lease(service_db)
    assert migrate([SERVICE, "down", "--reason", "test: after a killed command"]) == 0
    assert "Reverted 1 migration(s)" in capsys.readouterr().out
    assert lock_of(service_db).holder() is None


def test_a_dead_commands_lease_is_taken_over_by_an_airflow_task_without_asking_airflow(service_db):
    dead = dead_cli_lease(service_db)

    def never(holder: Holder) -> bool:
        raise AssertionError(f"asked Airflow about {holder}")

    taken = lock_of(service_db).acquire(RELEASE, is_over=never)
    assert taken.previous == dead and taken.holder.run_id == RELEASE.run_id


def test_a_reused_backend_pid_does_not_keep_a_dead_commands_lease(service_db):
    """The server reuses pids: a session that started after the lease was taken is not its holder."""
    other = psycopg2.connect(service_db)
    try:
        with other.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (backend,) = cur.fetchall()[0]
        holder = cli_holder("omni-migrate", "up", "x", backend)
        with psycopg2.connect(service_db) as conn:
            started = query(service_db, "SELECT backend_start FROM pg_stat_activity WHERE pid = %s", [backend])[0][0]
            alive = Holder(holder.dag_id, holder.run_id, "up", "x", started)
            assert cli_holder_is_over(conn, alive) is False
            import datetime

            reused = Holder(holder.dag_id, holder.run_id, "up", "x", started - datetime.timedelta(seconds=1))
            assert cli_holder_is_over(conn, reused) is True
            assert cli_holder_is_over(conn, RELEASE) is None  # not a command's lease: Airflow's to answer
        conn.close()
    finally:
        other.close()


def test_an_ended_airflow_run_is_taken_over_when_airflow_says_so(service_db, monkeypatch, capsys):
    import omnisphere_release.migrations.__main__ as cli

    lock_of(service_db).acquire(RELEASE, is_over=lambda _: False)
    asked: list[str] = []

    def ended(holder: Holder) -> bool:
        asked.append(holder.run_id)
        return True

    monkeypatch.setattr(cli, "airflow_run_is_over_from_env", ended)
    assert migrate([SERVICE, "down", "--reason", "test: the release ended"]) == 0
    assert asked == [RELEASE.run_id] and lock_of(service_db).holder() is None


# ---- the data migration CLI -----------------------------------------------------------------------------------------
def test_data_migration_run_is_refused_while_held_and_holds_the_lease_while_it_runs(scratch_database, sql_dir,
                                                                                      monkeypatch, capsys):
    monkeypatch.setenv("OMNI_PG_DSN_BILLING_SERVICE", scratch_database)
    monkeypatch.delenv("OMNI_AIRFLOW_URL", raising=False)
    monkeypatch.setenv("OMNI_PG_DSN_AUTH_SERVICE", scratch_database)
    assert migrate(["billing-service", "up", "--reason", "test: install"]) == 0
    tables = query(scratch_database, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
    billing = lock_of(scratch_database, "billing-service")
    billing.acquire(Holder("release_billing-service", "manual__1", "data_migrate", "release of billing-service"),
                    is_over=lambda _: False)
    capsys.readouterr()

    argv = ["billing-service", "backfill_invoice_due_dates", "run", "--reason", "test"]
    assert datamigrate(argv) == 2
    err = capsys.readouterr().err
    assert "refused: billing-service is held by release of billing-service (run manual__1" in err
    assert "Nothing was changed" in err
    assert query(scratch_database, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == tables
    assert datamigrate(["billing-service", "backfill_invoice_due_dates", "status"]) == 0  # reading needs no lease

    billing.release(Holder("release_billing-service", "manual__1", "", ""))
    from omnisphere_release.datamigrate.engine import DataMigrationEngine

    seen: list[Holder | None] = []
    original = DataMigrationEngine.run

    def observed(self, *args, **kwargs):
        seen.append(billing.holder())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DataMigrationEngine, "run", observed)
    assert datamigrate(argv) == 0, capsys.readouterr().err
    assert seen[0] is not None and seen[0].dag_id == "omni-datamigrate" and seen[0].task_id == "run"
    assert billing.holder() is None


def test_on_an_airflow_host_a_command_takes_over_the_lease_of_a_run_that_ended(devstack, airflow_db, sql_dir,
                                                                               tmp_path, monkeypatch, capsys):
    """A schema_migrations run keeps its lease after it ends (only a release gives it up early); a command on a
    machine where Airflow is configured (AIRFLOW_HOME) reads the run's state in Airflow's metadata database."""
    from tests.e2e.helpers import auth_service_at_version_3, run_dag

    auth_service_at_version_3(tmp_path, monkeypatch)
    monkeypatch.delenv("OMNI_AIRFLOW_URL", raising=False)
    assert os.environ.get("AIRFLOW_HOME")  # the test session's Airflow, whose metadata database dag.test writes
    outcome = run_dag("schema_migrations", {"service": SERVICE, "dry_run": False, "reason": "test: hold it"})
    assert outcome.state == "success", outcome.tasks
    dsn = os.environ["OMNI_PG_DSN_AUTH_SERVICE"]
    held = lock_of(dsn).holder()
    assert held is not None and (held.dag_id, held.run_id) == ("schema_migrations", outcome.run_id)
    capsys.readouterr()

    assert migrate([SERVICE, "down", "--to", "3", "--reason", "test: after that run"]) == 0, capsys.readouterr().err
    assert "Reverted 1 migration(s)" in capsys.readouterr().out
    assert lock_of(dsn).holder() is None
