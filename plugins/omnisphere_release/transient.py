"""What a lost database connection looks like, and the bounded retry that survives one.

A service database that restarts (a failover, a patch, a network blip) drops every connection. Work that is safe to
run again from the start (a migration plan, whose every migration commits with its history row; a read-only check;
a data migration, which resumes from its checkpoint) is run again once the database answers, within a bounded
budget, instead of failing the release and rolling it back. Only a lost connection is retried: an SQL error, a
statement timeout or a lock that was not granted will not heal by reconnecting, and each has its own rule.

Importable without Airflow: the engines use it too.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors

T = TypeVar("T")

# How long work waits for its database to come back before it gives up (a restart takes seconds; a failover, tens).
DATABASE_BUDGET_SECONDS = 60.0
MAX_DELAY_SECONDS = 10.0
# SQLSTATEs the server sends when it ends the session itself: admin_shutdown, crash_shutdown, cannot_connect_now
# (the server is starting up or shutting down); and class 08, "connection exception".
_SESSION_ENDED = ("57P01", "57P02", "57P03", "08000", "08001", "08003", "08004", "08006")
_SESSION_ENDED_CLASSES = tuple(psycopg2.errors.lookup(code) for code in _SESSION_ENDED)


class DatabaseUnreachable(RuntimeError):
    """The database stayed out of reach for longer than the budget; the message says what was tried and for how long."""


def connection_lost(exc: BaseException | None) -> bool:
    """Say whether ``exc`` (or the error it was raised from) is a lost or refused connection, not an SQL error.

    psycopg2 raises OperationalError without an SQLSTATE when the server cannot be reached or closed the socket,
    InterfaceError on a connection already closed, and a 57P0x or 08xxx SQLSTATE when the server ends the session.
    The engines wrap psycopg2's errors in their own; the original stays in ``__cause__`` or ``__context__``.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, psycopg2.InterfaceError):
            return True
        if isinstance(exc, psycopg2.OperationalError):
            code = exc.pgcode
            if code:
                return code in _SESSION_ENDED or code.startswith("08")
            # No SQLSTATE: the client's own error (refused, socket closed), unless a subclass says otherwise.
            return type(exc) is psycopg2.OperationalError or isinstance(exc, _SESSION_ENDED_CLASSES)
        exc = exc.__cause__ or exc.__context__
    return False


def retry_lost_connection(work: Callable[[], T], what: str, log: Any = None,
                          budget_seconds: float = DATABASE_BUDGET_SECONDS,
                          progress: Callable[[], object] | None = None,
                          sleep: Callable[[float], None] = time.sleep,
                          clock: Callable[[], float] = time.monotonic) -> T:
    """Run ``work``; while it fails with a lost connection, run it again (1, 2, 4... 10 s apart, jittered) until
    ``budget_seconds`` have passed since the connection was first lost. ``work`` must be safe to run again from its
    start. For long work, ``progress`` (e.g. the batches committed so far) tells one outage from the next: when its
    value changed since the last loss, the database answered in between, and the budget starts again.

    Raises DatabaseUnreachable once the budget is spent; any other error is raised as it is, at once.
    """
    log = log or logging.getLogger("omnisphere_release.transient")
    outage_began: float | None = None
    progress_then: object = None
    attempt = losses = 0
    while True:
        try:
            result = work()
        except Exception as exc:
            if not connection_lost(exc):
                raise
            now = clock()
            progress_now = progress() if progress is not None else None
            if outage_began is None or progress_now != progress_then:
                outage_began, progress_then, attempt = now, progress_now, 0
            waited = now - outage_began
            delay = min(MAX_DELAY_SECONDS, 2.0 ** attempt) * random.uniform(0.8, 1.2)
            attempt += 1
            losses += 1
            detail = " ".join(str(exc).split()) or type(exc).__name__
            if waited + delay > budget_seconds:
                raise DatabaseUnreachable(
                    f"{what}: lost the connection to the database and could not get it back within "
                    f"{budget_seconds:.0f}s ({attempt} attempt(s)): {detail}") from exc
            log.warning("%s: lost the connection to the database (%s); trying again in %.1fs (%.0fs of the %.0fs "
                        "budget left). What committed before the loss stays.", what, detail, delay,
                        budget_seconds - waited, budget_seconds)
            sleep(delay)
            continue
        if losses:
            log.info("%s: the database answered again after %d lost connection(s); carried on.", what, losses)
        return result
