"""One operation per service at a time: a lease row in the service's own database, held by one Airflow run.

A release, a manual rollback, a schema migration run and a data migration of the same service must never overlap: the
worst case is a release that ends green after a concurrent schema_migrations down and rollback_<service> undid it.
Each of them takes the service's lease at its first task that acts on the service and keeps it for the rest of its
run; every later task of the same run finds it already held by its own run.

A lease cannot outlive its run: whoever finds the service held asks (through ``is_over``) whether the holder's run
is still going, and takes the lease over if not. So a crashed worker or a killed run never blocks the service for
good, and nothing needs to release the lease on every path (the release's report does, early, as a courtesy).

The command lines (``omni-migrate``, the data migration CLI) take the same lease for their changes (:func:`cli_lease`).
Their holder is a process, not an Airflow run: it is recorded as ``cli:<user>@<host>:<pid>:<backend pid>`` and keeps
the PostgreSQL session that took the lease open until it ends. Whether such a holder is over is decided here, for
every contender, by whether that session still exists (:func:`cli_holder_is_over`): Airflow knows nothing of it (it
would answer "no such run", which must not free a live command's lease), and a killed command's session ends with it,
so a dead command never blocks the service either.

The row lives in the service database, beside the migration engine's bookkeeping, because every such operation can
reach that database, and a PostgreSQL row lock makes the take-over atomic. Importable without Airflow.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import socket
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2
from psycopg2 import sql

LOCK_TABLE = "omnisphere_operation_lock"
# pg_advisory_xact_lock(int4, int4) around the DDL: concurrent CREATE TABLE IF NOT EXISTS can still collide in
# PostgreSQL's catalog. The first key is the project's ('OMNI', as in the migration engine), the second this table's.
DDL_LOCK_KEYS = (0x4F4D4E49, 9)
LOCK_DDL = f"""
CREATE TABLE IF NOT EXISTS {LOCK_TABLE} (
    service      text        PRIMARY KEY,
    dag_id       text        NOT NULL,
    run_id       text        NOT NULL,
    task_id      text        NOT NULL,
    operation    text        NOT NULL,
    acquired_at  timestamptz NOT NULL DEFAULT now()
);
"""
#: The command lines that take a lease, recorded as the holder's dag_id (no DAG of the project has these ids).
CLI_TOOLS = ("omni-migrate", "omni-datamigrate")
# cli:<user>@<host>:<process id>:<PostgreSQL backend pid>; the user and host are for people, the backend for the rule.
_CLI_RUN_ID = re.compile(r"cli:(?P<who>.+):(?P<pid>\d+):(?P<backend>\d+)")
# The lease session's server-side TCP keepalives: a command whose host vanished (no FIN ever arrives) loses its
# session, and so its lease, within about a minute instead of the kernel's default two hours. Ignored on unix sockets.
_CLI_SESSION_SETTINGS = {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10", "tcp_keepalives_count": "3"}

log = logging.getLogger("omnisphere_release.locks")


@dataclass(frozen=True)
class Holder:
    """Who holds (or asks for) a service: an Airflow run or a command line, and what it is doing to the service."""

    dag_id: str
    run_id: str
    task_id: str
    operation: str
    acquired_at: datetime | None = None

    def same_run(self, other: Holder) -> bool:
        return (self.dag_id, self.run_id) == (other.dag_id, other.run_id)

    @property
    def is_cli(self) -> bool:
        """Say whether a command line holds it (:func:`cli_lease`), not an Airflow run."""
        return self._cli_parts() is not None

    @property
    def backend_pid(self) -> int | None:
        """Return the PostgreSQL backend whose session holds a command line's lease (None: an Airflow run)."""
        parts = self._cli_parts()
        return int(parts["backend"]) if parts else None

    def describe(self) -> str:
        since = f" since {self.acquired_at.isoformat(timespec='seconds')}" if self.acquired_at else ""
        parts = self._cli_parts()
        if parts:
            return (f"{self.operation} ({self.dag_id} {self.task_id} run by {parts['who']}, process {parts['pid']}, "
                    f"PostgreSQL session {parts['backend']}{since})")
        return f"{self.operation} (run {self.run_id} of {self.dag_id}, task {self.task_id}{since})"

    def what_ends_it(self) -> str:
        """Say how this holder's lease ends, for the person who was refused."""
        parts = self._cli_parts()
        if parts:
            return (f"Wait for that command to end, or stop it (process {parts['pid']} on {parts['who']}); its lease "
                    f"ends with its PostgreSQL session (if its host is gone: "
                    f"SELECT pg_terminate_backend({parts['backend']}) on the service database).")
        return "Wait for that run to end, or fail it in Airflow if it is stuck; its lease ends with it."

    def _cli_parts(self) -> re.Match[str] | None:
        return _CLI_RUN_ID.fullmatch(self.run_id) if self.dag_id in CLI_TOOLS else None


class ServiceBusy(RuntimeError):
    """Another run (or command line) that is still going holds the service."""

    def __init__(self, service: str, holder: Holder, note: str = "") -> None:
        super().__init__(f"{service} is held by {holder.describe()}: one operation per service at a time. "
                         f"{holder.what_ends_it()}" + (f" {note}" if note else ""))
        self.service = service
        self.holder = holder


@dataclass(frozen=True)
class Taken:
    """The outcome of :meth:`ServiceLock.acquire`: held anew, held already by this run, or taken over."""

    holder: Holder
    previous: Holder | None = None  # the finished run whose lease was taken over
    already_held: bool = False


class ServiceLock:
    """The lease of one service, in its database (``connect`` returns a new psycopg2 connection)."""

    def __init__(self, service: str, connect: Callable[[], Any]) -> None:
        self.service = service
        self.connect = connect

    def acquire(self, me: Holder, is_over: Callable[[Holder], bool]) -> Taken:
        """Take the service for ``me``'s run, or raise ServiceBusy naming the run that holds it.

        ``is_over(holder)`` says whether the holder's Airflow run has ended (its lease is then taken over); a command
        line's lease is judged here, by its PostgreSQL session (:func:`cli_holder_is_over`), never by ``is_over``.
        """
        conn = self.connect()
        try:
            return self.acquire_on(conn, me, is_over)
        finally:
            conn.close()

    def acquire_on(self, conn: Any, me: Holder, is_over: Callable[[Holder], bool]) -> Taken:
        """:meth:`acquire` on a connection the caller keeps open (a command line's lease lives as long as it)."""
        _create_table(conn)
        with conn, conn.cursor() as cur:
            cur.execute(sql.SQL("INSERT INTO {} (service, dag_id, run_id, task_id, operation) VALUES "
                                "(%s, %s, %s, %s, %s) ON CONFLICT (service) DO NOTHING RETURNING acquired_at")
                        .format(sql.Identifier(LOCK_TABLE)),
                        [self.service, me.dag_id, me.run_id, me.task_id, me.operation])
            row = cur.fetchone()
            if row:
                return Taken(Holder(me.dag_id, me.run_id, me.task_id, me.operation, row[0]))
            # Held: lock the row while deciding, so that two contenders cannot both take a finished lease over.
            cur.execute(sql.SQL("SELECT dag_id, run_id, task_id, operation, acquired_at FROM {} WHERE service = %s "
                                "FOR UPDATE").format(sql.Identifier(LOCK_TABLE)), [self.service])
            holder = Holder(*cur.fetchone())
            if holder.same_run(me):
                return Taken(holder, already_held=True)
            over = cli_holder_is_over(conn, holder)
            if over is None:
                over = is_over(holder)
            if not over:
                raise ServiceBusy(self.service, holder)
            cur.execute(sql.SQL("UPDATE {} SET dag_id = %s, run_id = %s, task_id = %s, operation = %s, "
                                "acquired_at = now() WHERE service = %s RETURNING acquired_at")
                        .format(sql.Identifier(LOCK_TABLE)),
                        [me.dag_id, me.run_id, me.task_id, me.operation, self.service])
            return Taken(Holder(me.dag_id, me.run_id, me.task_id, me.operation, cur.fetchone()[0]), holder)

    def release(self, me: Holder) -> bool:
        """Give the service up if ``me``'s run holds it; return whether it did."""
        conn = self.connect()
        try:
            return self.release_on(conn, me)
        finally:
            conn.close()

    def release_on(self, conn: Any, me: Holder) -> bool:
        """:meth:`release` on a connection the caller keeps open."""
        _create_table(conn)
        with conn, conn.cursor() as cur:
            cur.execute(sql.SQL("DELETE FROM {} WHERE service = %s AND dag_id = %s AND run_id = %s")
                        .format(sql.Identifier(LOCK_TABLE)), [self.service, me.dag_id, me.run_id])
            return bool(cur.rowcount)

    def holder(self) -> Holder | None:
        """Return who holds the service now, finished or not (None: nobody)."""
        conn = self.connect()
        try:
            _create_table(conn)
            with conn, conn.cursor() as cur:
                cur.execute(sql.SQL("SELECT dag_id, run_id, task_id, operation, acquired_at FROM {} "
                                    "WHERE service = %s").format(sql.Identifier(LOCK_TABLE)), [self.service])
                row = cur.fetchone()
                return Holder(*row) if row else None
        finally:
            conn.close()


def cli_holder_is_over(conn: Any, holder: Holder) -> bool | None:
    """Say whether a command line's lease is over: its PostgreSQL session is gone. None: not a command line's lease.

    The session is the backend recorded in the holder's run id, started no later than the lease was taken: the
    server reuses backend pids, and a new session that got the dead command's pid must not keep its lease alive.
    Asked on ``conn``, a connection to the same server (pg_stat_activity lists the sessions of every database).
    """
    backend = holder.backend_pid
    if backend is None:
        return None
    with conn.cursor() as cur:
        cur.execute("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s AND (%s::timestamptz IS NULL "
                    "OR backend_start <= %s::timestamptz))", [backend, holder.acquired_at, holder.acquired_at])
        return not cur.fetchone()[0]


def cli_holder(tool: str, action: str, operation: str, backend_pid: int) -> Holder:
    """Return the holder a command line records: ``tool`` (one of CLI_TOOLS) doing ``action`` to the service."""
    if tool not in CLI_TOOLS:
        raise ValueError(f"tool must be one of {', '.join(CLI_TOOLS)}, not {tool!r}")
    return Holder(tool, f"cli:{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}:{backend_pid}", action,
                  operation)


@contextmanager
def cli_lease(service: str, connect: Callable[[], Any], tool: str, action: str, operation: str,
              airflow_run_is_over: Callable[[Holder], bool | None] | None = None) -> Generator[Taken]:
    """Hold ``service``'s lease for a command line while the ``with`` block runs; release it at the end, also on
    an error or Ctrl-C. Raise ServiceBusy, having changed nothing, when a run or another command holds it.

    The lease is taken on a connection of its own, kept open for the whole block: its PostgreSQL session is what
    tells the others that this command is still going (a killed command loses it, and so its lease).
    ``airflow_run_is_over(holder)`` asks Airflow about an Airflow holder (None: cannot tell); without it, or when it
    cannot tell, an Airflow holder is taken to be still going.
    """
    conn = connect()
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT set_config('application_name', %s, false)", [f"{tool} lease {service}"[:63]])
            for name, value in _CLI_SESSION_SETTINGS.items():
                cur.execute("SELECT set_config(%s, %s, false)", [name, value])
            cur.execute("SELECT pg_backend_pid()")
            me = cli_holder(tool, action, operation, cur.fetchone()[0])
        lease = ServiceLock(service, connect)
        unanswered: list[str] = []

        def is_over(holder: Holder) -> bool:
            answer = airflow_run_is_over(holder) if airflow_run_is_over else None
            if answer is None:
                unanswered.append(holder.run_id)
            return bool(answer)

        try:
            taken = lease.acquire_on(conn, me, is_over)
        except ServiceBusy as exc:
            if not unanswered:
                raise
            raise ServiceBusy(service, exc.holder, note=(
                "This command could not ask Airflow whether that run has ended, so it treats it as going: set "
                "OMNI_AIRFLOW_URL and OMNI_AIRFLOW_TOKEN (or _USERNAME and _PASSWORD), as for omni-release, or run "
                "it where Airflow is configured (AIRFLOW_HOME), to let it ask.")) from None
        if taken.previous:
            log.info("%s: took over the lease of %s, which has ended.", service, taken.previous.describe())
        log.info("%s is held by this command (%s) for: %s. No release, rollback or migration of it starts until "
                 "this command ends.", service, me.run_id, operation)
        try:
            yield taken
        finally:
            _release_cli_lease(lease, conn, me)
    finally:
        conn.close()


def airflow_run_is_over_from_env(holder: Holder) -> bool | None:
    """Ask Airflow whether an Airflow holder's run has ended, for a command line; None when it cannot tell.

    Through the REST API with omni-release's settings (``OMNI_AIRFLOW_URL`` and its credentials) when they are set;
    else, on a machine configured as an Airflow host (``AIRFLOW_HOME`` or ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``
    set, as ``. .devstack/env`` does), through Airflow's metadata database, as ``airflow dags list-runs`` does.
    Only a run Airflow reports as success or failed is over: a run it cannot find is "cannot tell", since a wrong
    URL or another Airflow's database cannot find it either, and a live release's lease must never go on a guess.
    """
    if os.environ.get("OMNI_AIRFLOW_URL"):
        state = _run_state_from_api(holder, os.environ["OMNI_AIRFLOW_URL"])
    elif os.environ.get("AIRFLOW_HOME") or os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
        state = _run_state_from_metadata(holder)
    else:
        return None
    if state is None:
        return None
    log.info("Airflow says run %s of %s is %s.", holder.run_id, holder.dag_id, state)
    return state in FINISHED_RUN_STATES


#: The states of an Airflow run that has ended (DagRunState's values).
FINISHED_RUN_STATES = ("success", "failed")


def _run_state_from_api(holder: Holder, url: str) -> str | None:
    import httpx

    from omnisphere_release.client import AirflowApi, ClientError  # imports Airflow: only when needed

    try:
        api = AirflowApi(url, os.environ.get("OMNI_AIRFLOW_TOKEN"), os.environ.get("OMNI_AIRFLOW_USERNAME"),
                         os.environ.get("OMNI_AIRFLOW_PASSWORD"), timeout=15.0)
        return str(api.run(holder.dag_id, holder.run_id).get("state"))
    except (ClientError, httpx.HTTPError, ValueError) as exc:  # ValueError: an answer that is not JSON
        log.warning("Could not ask Airflow at %s whether %s has ended: %s", url, holder.describe(), exc)
        return None


def _run_state_from_metadata(holder: Holder) -> str | None:
    try:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            state = session.scalar(select(DagRun.state).where(DagRun.dag_id == holder.dag_id,
                                                              DagRun.run_id == holder.run_id))
    except Exception as exc:  # noqa: BLE001 - whatever Airflow's configuration or database says, it cannot tell
        log.warning("Could not read Airflow's metadata database to tell whether %s has ended: %s", holder.describe(),
                    exc)
        return None
    if state is None:
        log.warning("Airflow's metadata database has no run %s of %s: cannot tell whether it has ended.",
                    holder.run_id, holder.dag_id)
        return None
    return str(getattr(state, "value", state))


def _release_cli_lease(lease: ServiceLock, conn: Any, me: Holder) -> None:
    """Give the lease up on its own session, or on a new one if that session broke (it is over then anyway)."""
    try:
        conn.rollback()  # an interrupted statement may have left the session in a failed transaction
        lease.release_on(conn, me)
    except psycopg2.Error:
        try:
            lease.release(me)
        except psycopg2.Error as exc:
            log.warning("%s: could not delete this command's lease row (%s); its session is gone, so the next "
                        "operation takes it over.", lease.service, str(exc).strip())
            return
    log.info("%s is free again for other operations.", lease.service)


def _create_table(conn: Any) -> None:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", [LOCK_TABLE])
        if not cur.fetchone()[0]:
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", DDL_LOCK_KEYS)
            cur.execute(LOCK_DDL)
