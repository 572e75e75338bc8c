"""One operation per service at a time: a lease row in the service's own database, held by one Airflow run.

A release, a manual rollback, a schema migration run and a data migration of the same service must never overlap: the
worst case is a release that ends green after a concurrent schema_migrations down and rollback_<service> undid it.
Each of them takes the service's lease at its first task that acts on the service and keeps it for the rest of its
run; every later task of the same run finds it already held by its own run.

A lease cannot outlive its run: whoever finds the service held asks (through ``is_over``) whether the holder's run
is still going, and takes the lease over if not. So a crashed worker or a killed run never blocks the service for
good, and nothing needs to release the lease on every path (the release's report does, early, as a courtesy).

The row lives in the service database, beside the migration engine's bookkeeping, because every such operation can
reach that database, and a PostgreSQL row lock makes the take-over atomic. Importable without Airflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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


@dataclass(frozen=True)
class Holder:
    """Who holds (or asks for) a service: an Airflow run, and what it is doing to the service."""

    dag_id: str
    run_id: str
    task_id: str
    operation: str
    acquired_at: datetime | None = None

    def same_run(self, other: Holder) -> bool:
        return (self.dag_id, self.run_id) == (other.dag_id, other.run_id)

    def describe(self) -> str:
        since = f" since {self.acquired_at.isoformat(timespec='seconds')}" if self.acquired_at else ""
        return f"{self.operation} (run {self.run_id} of {self.dag_id}, task {self.task_id}{since})"


class ServiceBusy(RuntimeError):
    """Another run that is still going holds the service."""

    def __init__(self, service: str, holder: Holder) -> None:
        super().__init__(f"{service} is held by {holder.describe()}: one operation per service at a time. Wait for "
                         f"that run to end, or fail it in Airflow if it is stuck; its lease ends with it.")
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

        ``is_over(holder)`` says whether the holder's run has ended (its lease is then taken over).
        """
        conn = self.connect()
        try:
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
                if not is_over(holder):
                    raise ServiceBusy(self.service, holder)
                cur.execute(sql.SQL("UPDATE {} SET dag_id = %s, run_id = %s, task_id = %s, operation = %s, "
                                    "acquired_at = now() WHERE service = %s RETURNING acquired_at")
                            .format(sql.Identifier(LOCK_TABLE)),
                            [me.dag_id, me.run_id, me.task_id, me.operation, self.service])
                return Taken(Holder(me.dag_id, me.run_id, me.task_id, me.operation, cur.fetchone()[0]), holder)
        finally:
            conn.close()

    def release(self, me: Holder) -> bool:
        """Give the service up if ``me``'s run holds it; return whether it did."""
        conn = self.connect()
        try:
            _create_table(conn)
            with conn, conn.cursor() as cur:
                cur.execute(sql.SQL("DELETE FROM {} WHERE service = %s AND dag_id = %s AND run_id = %s")
                            .format(sql.Identifier(LOCK_TABLE)), [self.service, me.dag_id, me.run_id])
                return bool(cur.rowcount)
        finally:
            conn.close()

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


def _create_table(conn: Any) -> None:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", [LOCK_TABLE])
        if not cur.fetchone()[0]:
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", DDL_LOCK_KEYS)
            cur.execute(LOCK_DDL)
