"""Run a data migration in keyset batches, one transaction each, with a checkpoint that makes it resumable.

Each batch is one transaction of three statements: find the batch's upper key (which also reads whether a pause was
asked), run the spec's statement (or its Python function) for ``last < key <= upper``, and advance the checkpoint row.
After any crash the next run continues from the last committed batch: no row is processed twice or skipped. With a SQL
statement rows never travel through Python, so memory does not grow with the table; a Python function holds one
batch at most.

The upper key of a batch of n keys: on a dense key (a serial with few gaps, as the planner sees it when the run
starts) it is the first key left plus n - 1, one probe of the index, and the batch holds at most n rows (the keys
are unique integers); a hole in the keys is jumped over at once. On a sparse key it is the n-th key after the last,
found by walking the index (``ORDER BY key OFFSET n - 1 LIMIT 1``), which reads n index entries per batch: about 4 %
of a migration's time at 1M rows, hence the dense case. Either way no batch exceeds the spec's maximum.

Nothing else runs per batch: the estimate of the rows to go comes from the planner once at the start (a count(*) is a
full scan, minutes on a large table), a pause request is read by the batch's own statements, and progress is logged
every few seconds, not per batch. Batch sizes adapt to the spec's target duration (:class:`BatchSizer`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2 import sql

from omnisphere_release.datamigrate.code import BatchFunction, load_functions
from omnisphere_release.datamigrate.spec import DataMigrationSpec
from omnisphere_release.logs import Log
from omnisphere_release.migrations.errors import InvalidMigrationInput, LockBusy, MigrationFailed
from omnisphere_release.transient import (
    DATABASE_BUDGET_SECONDS,
    DatabaseUnreachable,
    connection_lost,
    retry_lost_connection,
)

CHECKPOINT_TABLE = "omnisphere_data_migrations"
ADVISORY_LOCK_NAMESPACE = 0x4F4D4E49
DATA_MIGRATION_LOCK = 2
LOCK_WAIT_AFTER_RECONNECT_SECONDS = 15.0
# Keys per key value, as the planner estimates them for the range left, at or above which a batch's upper key is its
# first key plus its size (see the module's docstring). Below it, batches of key ranges would hold too few rows.
DENSE_KEYS = 0.8

_DDL = f"""
CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} (
    name          text        NOT NULL,
    direction     text        NOT NULL CHECK (direction IN ('forward', 'revert')),
    spec_checksum text        NOT NULL,
    last_key      bigint,
    end_key       bigint,
    rows_done     bigint      NOT NULL DEFAULT 0,
    batches       bigint      NOT NULL DEFAULT 0,
    state         text        NOT NULL DEFAULT 'running'
                  CHECK (state IN ('running', 'pause_requested', 'paused', 'done', 'failed')),
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    run_by        text        NOT NULL,
    error         text,
    PRIMARY KEY (name, direction)
)
"""


@dataclass
class Checkpoint:
    name: str
    direction: str
    last_key: int | None
    end_key: int | None
    rows_done: int
    batches: int
    state: str
    error: str | None

    def describe(self) -> str:
        return (f"{self.name} ({self.direction}): {self.state}, {self.rows_done} rows in {self.batches} batches, "
                f"last key {self.last_key} of {self.end_key}" + (f", error: {self.error}" if self.error else ""))


@dataclass
class DataRunResult:
    name: str
    direction: str
    state: str  # done, paused, or already_done
    rows: int
    batches: int
    seconds: float
    resumed_from: int | None
    smallest_batch: int = 0  # the batch sizes (keys per batch) this run asked for, within the spec's bounds
    largest_batch: int = 0
    verify_seconds: float = 0.0  # of ``seconds``, the verification query's

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass
class _Progress:
    """What one run() did so far, across the connections a lost connection made it open."""

    started: float
    rows: int = 0
    batches: int = 0
    sessions: int = 0
    resumed_from: int | None = None
    smallest_batch: int = 0
    largest_batch: int = 0
    sizer: BatchSizer | None = None  # kept across a reconnect: the sizes learnt so far still hold
    first_key: int | None = None  # the checkpoint this run started from
    verify_seconds: float = 0.0

    def count(self, rows: int, size: int) -> None:
        """Count one committed batch of ``rows`` changed rows, asked for with a size of ``size`` keys."""
        self.rows += rows
        self.batches += 1
        self.smallest_batch = min(self.smallest_batch or size, size)
        self.largest_batch = max(self.largest_batch, size)

    def result(self, name: str, direction: str, state: str) -> DataRunResult:
        return DataRunResult(name, direction, state, self.rows, self.batches, time.monotonic() - self.started,
                             self.resumed_from, self.smallest_batch, self.largest_batch, self.verify_seconds)


class BatchSizer:
    """Size each batch so that it takes about ``target_seconds``, never outside [smallest, largest].

    After each batch the next size is this one scaled by target / measured, at most doubled or halved: one batch slowed
    by a checkpoint or a cold cache does not swing the size, and a run that starts far from the target gets there in a
    few batches. A target of 0 keeps every batch at its first size.
    """

    def __init__(self, first: int, smallest: int, largest: int, target_seconds: float) -> None:
        self.smallest, self.largest, self.target_seconds = smallest, largest, target_seconds
        self.size = self._bounded(first)

    def _bounded(self, size: float) -> int:
        return int(max(self.smallest, min(self.largest, size)))

    def observe(self, seconds: float) -> None:
        """Size the next batch from how long the last one (of ``self.size`` keys) took."""
        if self.target_seconds and seconds > 0:
            self.size = self._bounded(min(2.0, max(0.5, self.target_seconds / seconds)) * self.size)

    def shrink(self) -> None:
        """Halve the next batch (a batch that timed out on a lock: fewer rows, fewer locks to wait for)."""
        if self.target_seconds:
            self.size = self._bounded(self.size / 2)

    def describe(self) -> str:
        if not self.target_seconds:
            return f"batches of {self.size}"
        return (f"batches sized to ~{self.target_seconds:g}s each, from {self.size} within "
                f"[{self.smallest}, {self.largest}]")


@dataclass(frozen=True)
class _Batch:
    ran: bool  # False: a pause was asked before it, or no key is left
    last_key: int | None  # the checkpoint after it
    rows: int  # rows the statement or function changed
    pause: bool  # a pause was asked (before or while it ran)


class _FunctionFailed(Exception):
    """A spec's Python function raised, or broke the batch's transaction; the batch was rolled back."""


class DataMigrationEngine:
    def __init__(self, spec: DataMigrationSpec, connect: Callable[[], Any], run_by: str = "cli",
                 log: Log | None = None, progress_seconds: float = 5.0,
                 lock_retries: int = 5, reconnect_budget_seconds: float = DATABASE_BUDGET_SECONDS) -> None:
        self.spec = spec
        self._connect = connect
        self.run_by = run_by
        self.log = log or logging.getLogger("omnisphere_release.datamigrate")
        self.progress_seconds = progress_seconds
        self.lock_retries = lock_retries
        self.reconnect_budget_seconds = reconnect_budget_seconds

    # ---- public API --------------------------------------------------------------------------------------------------
    def run(self, direction: str = "forward", max_batches: int | None = None) -> DataRunResult:
        """Run (or resume) the migration to its end, then verify; stop early on a pause request or ``max_batches``.

        A connection lost between batches, or during one (whose transaction the server then rolls back), is
        survived: the engine reconnects within ``reconnect_budget_seconds`` and goes on from the checkpoint, so no
        row is processed twice or skipped. A database out of reach for longer raises MigrationFailed.
        """
        if direction not in {"forward", "revert"}:
            raise InvalidMigrationInput(f"direction must be 'forward' or 'revert', not {direction!r}")
        if direction == "revert" and not self.spec.reversible:
            raise InvalidMigrationInput(f"{self.spec.path}: data migration {self.spec.name} is not reversible "
                                        f"(reversible: false); restore the backup taken before it instead")
        # A spec whose functions (either direction's) cannot be imported or called is refused here, before any
        # connection is opened.
        functions = load_functions(self.spec)
        kind, target = self.spec.batch_work(direction)
        work: str | BatchFunction = (functions["python" if direction == "forward" else "revert_python"]
                                     if kind == "python" else self.spec.bind(target))
        progress = _Progress(started=time.monotonic(), sizer=BatchSizer(
            self.spec.batch_size, self.spec.min_batch_size or self.spec.batch_size,
            self.spec.max_batch_size or self.spec.batch_size, self.spec.batch_seconds))
        try:
            return retry_lost_connection(lambda: self._run_session(direction, work, max_batches, progress),
                                         f"data migration {self.spec.name} ({direction})", self.log,
                                         self.reconnect_budget_seconds, progress=lambda: progress.batches)
        except DatabaseUnreachable as exc:
            raise MigrationFailed(f"{exc}. Committed batches stay ({progress.rows} rows in {progress.batches} "
                                  f"batches this run); run it again to resume.") from None

    def _run_session(self, direction: str, work: str | BatchFunction, max_batches: int | None,
                     progress: _Progress) -> DataRunResult:
        """Run the migration on one connection, from its checkpoint, counting into ``progress``."""
        conn = self._connect()
        conn.autocommit = False
        reconnected = progress.sessions > 0
        progress.sessions += 1
        try:
            self._prepare_session(conn)
            # After a lost connection the server may not have noticed yet that the old session is gone.
            self._lock(conn, wait_seconds=LOCK_WAIT_AFTER_RECONNECT_SECONDS if reconnected else 0.0)
            checkpoint = self._checkpoint(conn, direction)
            if checkpoint.state == "done":
                if reconnected:  # the last batches and the verification committed before the connection was lost
                    return progress.result(self.spec.name, direction, "done")
                self.log.info("%s: already done (%s); nothing to do.", self.spec.name, checkpoint.describe())
                return DataRunResult(self.spec.name, direction, "already_done", 0, 0, 0.0, checkpoint.last_key)
            if not reconnected:
                progress.resumed_from = checkpoint.last_key if checkpoint.batches else None
                progress.first_key = checkpoint.last_key
            self._set_state(conn, direction, "running")
            total = self._estimate_remaining(conn, checkpoint)
            span = (checkpoint.end_key or 0) - (checkpoint.last_key or 0)
            dense = span > 0 and total >= DENSE_KEYS * span
            sizer = progress.sizer
            assert sizer is not None  # made by run()
            self.log.info("%s %s: %s from key %s to %s, about %d rows to go (planner estimate), %s, each %s%s%s.",
                          self.spec.name, direction,
                          "resuming" if reconnected or progress.resumed_from is not None else "starting",
                          checkpoint.last_key, checkpoint.end_key, total, sizer.describe(),
                          "a range of that many key values (dense keys)" if dense
                          else "that many keys found by walking the index (sparse keys)",
                          f", by {self.spec.python if direction == 'forward' else self.spec.revert_python}"
                          if callable(work) else "",
                          f", throttled to {self.spec.rows_per_second:.0f} rows/s" if self.spec.rows_per_second else "")
            last_report = time.monotonic()
            last_key = checkpoint.last_key
            while True:
                if max_batches is not None and progress.batches >= max_batches:
                    return progress.result(self.spec.name, direction, "paused")
                size = sizer.size
                batch_started = time.monotonic()
                batch = self._batch(conn, work, direction, last_key, checkpoint.end_key, sizer, dense)
                batch_seconds = time.monotonic() - batch_started
                if batch.ran:
                    progress.count(batch.rows, size)
                    last_key = batch.last_key
                if batch.pause:
                    self._set_state(conn, direction, "paused")
                    self.log.info("%s: paused on request at key %s after %d rows; run it again to resume.",
                                  self.spec.name, last_key, progress.rows)
                    return progress.result(self.spec.name, direction, "paused")
                if not batch.ran:
                    break  # no key left in the range
                sizer.observe(batch_seconds)
                self._throttle(batch.rows, batch_seconds)
                if time.monotonic() - last_report >= self.progress_seconds:
                    self._progress(progress, last_key, checkpoint.end_key, sizer.size)
                    last_report = time.monotonic()
            verify_started = time.monotonic()
            self._verify(conn, direction)
            progress.verify_seconds = time.monotonic() - verify_started
            if direction == "revert":
                # Reverted means "never ran": forget both checkpoints, so a later release runs it again from the start.
                with conn, conn.cursor() as cur:
                    cur.execute(sql.SQL("DELETE FROM {} WHERE name = %s").format(sql.Identifier(CHECKPOINT_TABLE)),
                                [self.spec.name])
            else:
                self._set_state(conn, direction, "done")
            result = progress.result(self.spec.name, direction, "done")
            self.log.info("%s %s done: %d rows in %d batches of %d to %d keys, %.1fs (%.0f rows/s); %s.",
                          self.spec.name, direction, result.rows, result.batches, result.smallest_batch,
                          result.largest_batch, result.seconds, result.rows_per_second,
                          f"verification passed in {result.verify_seconds:.1f}s" if direction == "forward"
                          else "checkpoint forgotten")
            return result
        except (InvalidMigrationInput, MigrationFailed):
            raise
        except (psycopg2.Error, _FunctionFailed) as exc:
            if connection_lost(exc):
                raise  # nothing can be recorded on a dead connection; run() reconnects and resumes
            conn.rollback()
            message = str(exc).strip()
            self._record_failure(conn, direction, message)
            raise MigrationFailed(f"{self.spec.name} failed after key {self._last_key(conn, direction)}: {message}. "
                                  f"Committed batches stay; fix the cause and run it again to resume.") from None
        finally:
            conn.close()

    def request_pause(self) -> None:
        """Ask a running migration to stop after its current batch (it checks between batches)."""
        conn = self._connect()
        try:
            with conn, conn.cursor() as cur:
                cur.execute(_DDL)
                cur.execute(sql.SQL("UPDATE {} SET state = 'pause_requested', updated_at = now() WHERE name = %s "
                                    "AND state = 'running'").format(sql.Identifier(CHECKPOINT_TABLE)),
                            [self.spec.name])
        finally:
            conn.close()

    def status(self, direction: str = "forward") -> Checkpoint | None:
        conn = self._connect()
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT to_regclass(%s) IS NOT NULL", [CHECKPOINT_TABLE])
                if not cur.fetchone()[0]:
                    return None
                return self._read(cur, direction)
        finally:
            conn.close()

    # ---- batches -----------------------------------------------------------------------------------------------------
    def _batch(self, conn: Any, work: str | BatchFunction, direction: str, last_key: int | None,
               end_key: int | None, sizer: BatchSizer, dense: bool) -> _Batch:
        """Run one batch of ``sizer.size`` keys after ``last_key``, unless a pause was asked or no key is left."""
        table = sql.Identifier(*self.spec.table.split("."))
        key = sql.Identifier(self.spec.key)
        checkpoint = sql.Identifier(CHECKPOINT_TABLE)
        # One round trip for the upper key and for a pause asked since the last batch.
        if dense:  # the first key left, plus the size: one index probe
            upper_key = sql.SQL("(SELECT min({key}) FROM {table} WHERE {key} > %(last)s AND {key} <= %(end)s) "
                                "+ %(size)s - 1").format(key=key, table=table)
        else:  # the size-th key after the last (OFFSET walks the index without aggregating: half the time of max()
            # over a LIMIT), or when fewer are left the last one (max() from the index's end)
            upper_key = sql.SQL("coalesce((SELECT {key} FROM {table} WHERE {key} > %(last)s AND {key} <= %(end)s "
                                "ORDER BY {key} OFFSET %(size)s - 1 LIMIT 1), (SELECT max({key}) FROM {table} WHERE "
                                "{key} > %(last)s AND {key} <= %(end)s))").format(key=key, table=table)
        find = sql.SQL("SELECT {upper_key}, (SELECT state FROM {checkpoint} WHERE name = %(name)s "
                       "AND direction = %(direction)s)").format(upper_key=upper_key, checkpoint=checkpoint)
        attempt = 0
        while True:
            size = sizer.size
            try:
                with conn, conn.cursor() as cur:
                    cur.execute(find, {"last": last_key, "end": end_key, "size": size, "name": self.spec.name,
                                       "direction": direction})
                    upper, state = cur.fetchone()
                    if upper is not None and end_key is not None:
                        upper = min(upper, end_key)  # a dense batch's range ends at the migration's last key
                    if state == "pause_requested":
                        return _Batch(ran=False, last_key=last_key, rows=0, pause=True)
                    if upper is None:
                        return _Batch(ran=False, last_key=last_key, rows=0, pause=False)
                    if callable(work):
                        count = self._call(work, direction, conn, last_key, upper)
                    else:
                        cur.execute(work, {"last_key": last_key, "upper_key": upper, "batch_size": size})
                        count = max(cur.rowcount, 0)
                    cur.execute(sql.SQL("UPDATE {} SET last_key = %s, rows_done = rows_done + %s, "
                                        "batches = batches + 1, updated_at = now() WHERE name = %s AND direction = %s "
                                        "RETURNING state").format(checkpoint),
                                [upper, count, self.spec.name, direction])
                    pause = cur.fetchone()[0] == "pause_requested"  # asked while this batch ran
                return _Batch(ran=True, last_key=upper, rows=count, pause=pause)
            except psycopg2.errors.LockNotAvailable:
                attempt += 1
                if attempt > self.lock_retries:
                    raise
                delay = min(10.0, 0.5 * 2 ** attempt)
                sizer.shrink()
                self.log.warning("%s: batch of %d keys after key %s waited %d ms for a lock; retry %d of %d in %.1fs "
                                 "with %d keys", self.spec.name, size, last_key, self.spec.lock_timeout_ms, attempt,
                                 self.lock_retries, delay, sizer.size)
                time.sleep(delay)

    def _call(self, function: BatchFunction, direction: str, conn: Any, last_key: int | None, upper: int) -> int:
        """Run the spec's Python function for one key range in the batch's transaction; return the rows it changed."""
        target = self.spec.python if direction == "forward" else self.spec.revert_python
        where = f"{target} for keys {last_key} < {self.spec.key} <= {upper}"
        try:
            changed = function(conn, last_key, upper)
        except psycopg2.Error:
            raise  # a lost connection, a lock timeout or an SQL error: handled as for a SQL statement
        except Exception as exc:  # the function's own failure, reported with its range
            raise _FunctionFailed(f"{where} raised {type(exc).__name__}: {exc}") from exc
        if conn.autocommit or conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_INTRANS:
            raise _FunctionFailed(f"{where} committed, rolled back or left the batch's transaction; it must not: the "
                                  f"engine commits its rows together with the checkpoint (what it committed stays)")
        if not isinstance(changed, int) or isinstance(changed, bool) or changed < 0:
            raise _FunctionFailed(f"{where} returned {changed!r}; it must return how many rows it changed (an int)")
        return changed

    def _throttle(self, rows: int, batch_seconds: float) -> None:
        wait = self.spec.pause_ms / 1000
        if self.spec.rows_per_second:
            wait = max(wait, rows / self.spec.rows_per_second - batch_seconds)
        if wait > 0:
            time.sleep(wait)

    def _progress(self, progress: _Progress, last_key: int | None, end_key: int | None, batch_size: int) -> None:
        """Log rows done, the rows to go and the ETA, extrapolated from the share of the key range walked so far.

        The key range is exact where the planner's estimate is not (a table never analysed), and the rows counted are
        the rows the statement changed, so the total is of the same kind.
        """
        elapsed = time.monotonic() - progress.started
        rows = progress.rows
        walked = (last_key or 0) - (progress.first_key or 0)
        left = max((end_key or 0) - (last_key or 0), 0)
        share = walked / (walked + left) if walked + left > 0 else 1.0
        total = round(rows / share) if share > 0 else rows
        eta = elapsed * left / walked if walked > 0 else float("inf")
        self.log.info("%s: %d / ~%d rows (%.0f%% of the keys), %.0f rows/s, batches of %d now, ETA %s",
                      self.spec.name, rows, total, 100 * share, rows / elapsed if elapsed else 0, batch_size,
                      f"{eta:.0f}s" if eta != float("inf") else "unknown")

    def _verify(self, conn: Any, direction: str) -> None:
        if direction == "revert":
            return
        with conn, conn.cursor() as cur:
            cur.execute(self.spec.verify)
            row = cur.fetchone()
        if not row or row[0] is not True:
            message = f"verification returned {row!r}, expected a first column of true: {' '.join(self.spec.verify.split())}"
            self._record_failure(conn, direction, message)
            raise MigrationFailed(f"{self.spec.name}: {message}. Every batch ran; inspect the data, then fix and "
                                  f"revert or rerun.")

    # ---- session, lock and checkpoint -------------------------------------------------------------------------------
    def _prepare_session(self, conn: Any) -> None:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT set_config('application_name', %s, false)",
                        [f"omni-datamigrate {self.spec.name} {self.run_by}"[:63]])
            cur.execute("SELECT set_config('lock_timeout', %s, false)", [f"{self.spec.lock_timeout_ms}ms"])
            cur.execute("SELECT set_config('statement_timeout', %s, false)", [f"{self.spec.statement_timeout_ms}ms"])
            cur.execute("SELECT set_config('client_connection_check_interval', '1s', false)")
            cur.execute(_DDL)

    def _lock(self, conn: Any, wait_seconds: float = 0.0) -> None:
        deadline = time.monotonic() + wait_seconds
        with conn, conn.cursor() as cur:
            while True:
                cur.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                            [ADVISORY_LOCK_NAMESPACE, self.spec.name])
                if cur.fetchone()[0]:
                    return
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
            cur.execute("SELECT a.application_name, a.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                        "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = hashtext(%s)::oid "
                        "AND l.granted", [ADVISORY_LOCK_NAMESPACE, self.spec.name])
            holder = cur.fetchone()
            raise LockBusy(f"{self.spec.name} is already running: {holder[0] if holder else 'another session'} "
                           f"(pid {holder[1] if holder else '?'}); let it finish or pause it")

    def _checkpoint(self, conn: Any, direction: str) -> Checkpoint:
        table = sql.Identifier(*self.spec.table.split("."))
        key = sql.Identifier(self.spec.key)
        with conn, conn.cursor() as cur:
            existing = self._read(cur, direction)
            if existing is not None and (existing.state == "done" or existing.batches):
                return existing
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", [self.spec.table])
            if not cur.fetchone()[0]:
                raise InvalidMigrationInput(f"{self.spec.path}: field table: {self.spec.table} does not exist")
            cur.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
                        "AND attname = %s AND NOT attisdropped", [self.spec.table, self.spec.key])
            key_type = cur.fetchone()
            if not key_type or key_type[0] not in {"bigint", "integer", "smallint"}:
                raise InvalidMigrationInput(f"{self.spec.path}: field key: {self.spec.table}.{self.spec.key} must be "
                                            f"an integer column (found {key_type[0] if key_type else 'no column'})")
            # The range is fixed when the migration starts: rows inserted later are the application's business.
            cur.execute(sql.SQL("SELECT min({key}) - 1, max({key}) FROM {table}").format(key=key, table=table))
            start, end = cur.fetchone()
            cur.execute(sql.SQL("INSERT INTO {} (name, direction, spec_checksum, last_key, end_key, run_by) "
                                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name, direction) DO UPDATE SET "
                                "last_key = EXCLUDED.last_key, end_key = EXCLUDED.end_key, state = 'running', "
                                "error = NULL").format(sql.Identifier(CHECKPOINT_TABLE)),
                        [self.spec.name, direction, self.spec.checksum, start if start is not None else 0,
                         end if end is not None else 0, self.run_by])
            written = self._read(cur, direction)
            assert written is not None  # the row was just written in this transaction
            return written

    def _read(self, cur: Any, direction: str) -> Checkpoint | None:
        cur.execute(sql.SQL("SELECT name, direction, last_key, end_key, rows_done, batches, state, error FROM {} "
                            "WHERE name = %s AND direction = %s").format(sql.Identifier(CHECKPOINT_TABLE)),
                    [self.spec.name, direction])
        row = cur.fetchone()
        return Checkpoint(*row) if row else None

    def _estimate_remaining(self, conn: Any, checkpoint: Checkpoint) -> int:
        """Return the planner's estimate of the rows left to walk: free, where a count(*) would scan the table."""
        with conn, conn.cursor() as cur:
            cur.execute(sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {table} WHERE {key} > %s AND {key} <= %s").format(
                table=sql.Identifier(*self.spec.table.split(".")), key=sql.Identifier(self.spec.key)),
                [checkpoint.last_key, checkpoint.end_key])
            plan = cur.fetchone()[0]
            return int(plan[0]["Plan"]["Plan Rows"])

    def _set_state(self, conn: Any, direction: str, state: str) -> None:
        with conn, conn.cursor() as cur:
            cur.execute(sql.SQL("UPDATE {} SET state = %s, updated_at = now(), finished_at = CASE WHEN %s = 'done' "
                                "THEN now() END, error = CASE WHEN %s = 'failed' THEN error END WHERE name = %s AND "
                                "direction = %s").format(sql.Identifier(CHECKPOINT_TABLE)),
                        [state, state, state, self.spec.name, direction])

    def _record_failure(self, conn: Any, direction: str, message: str) -> None:
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql.SQL("UPDATE {} SET state = 'failed', error = %s, updated_at = now() WHERE name = %s "
                                    "AND direction = %s").format(sql.Identifier(CHECKPOINT_TABLE)),
                            [message[:2000], self.spec.name, direction])
        except psycopg2.Error:
            self.log.warning("%s: could not record the failure in %s", self.spec.name, CHECKPOINT_TABLE)

    def _last_key(self, conn: Any, direction: str) -> Any:
        try:
            with conn, conn.cursor() as cur:
                checkpoint = self._read(cur, direction)
                return checkpoint.last_key if checkpoint else None
        except psycopg2.Error:
            return "?"
