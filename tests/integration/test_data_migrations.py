"""The data migration engine against real PostgreSQL: resumable after SIGKILL, pausable, verified, bounded."""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psycopg2
import pytest
import yaml

from omnisphere_release.datamigrate import DataMigrationEngine, load_spec
from omnisphere_release.migrations import InvalidMigrationInput, MigrationFailed

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ROWS = 6000


def prepare(dsn: str, rows: int = ROWS, step: int = 3) -> None:
    """Make ``events`` with keys step, 2 * step, ...: sparse for the engine at step 3 (batches walk the index), dense
    at step 1 (batches are key ranges); analysed, as the planner's estimate decides which."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE events (id bigint PRIMARY KEY, account bigint NOT NULL, kind text NOT NULL)")
        cur.execute("CREATE TABLE events_v2 (id bigint PRIMARY KEY, account bigint NOT NULL, kind text NOT NULL, "
                    "kind_code int NOT NULL)")
        # gaps in the keys, as a real table has after deletes
        cur.execute("INSERT INTO events SELECT g * %s, g %% 97, (ARRAY['a','b','c'])[1 + g %% 3] "
                    "FROM generate_series(1, %s) g", [step, rows])
        cur.execute("ANALYZE events")


def spec_file(folder: Path, **overrides) -> Path:
    data = {
        "description": "copy events into events_v2 with a kind code",
        "table": "events", "key": "id", "batch_size": 100,
        "batch_seconds": 0,  # every batch 100 keys: the tests below count batches and aim at the keys of one
        "statement": "INSERT INTO events_v2 SELECT id, account, kind, ascii(kind) FROM events "
                     "WHERE id > :last_key AND id <= :upper_key",
        "verify": "SELECT (SELECT count(*) FROM events) = (SELECT count(*) FROM events_v2)",
        "reversible": True,
        "revert": "DELETE FROM events_v2 WHERE id > :last_key AND id <= :upper_key",
        **overrides,
    }
    path = folder / "copy_events.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def checksum(dsn: str) -> tuple[int, str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), md5(coalesce(string_agg(id || ':' || account || ':' || kind || ':' || kind_code, "
                    "',' ORDER BY id), '')) FROM events_v2")
        return cur.fetchone()


def expected_checksum(dsn: str) -> tuple[int, str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), md5(coalesce(string_agg(id || ':' || account || ':' || kind || ':' || "
                    "ascii(kind), ',' ORDER BY id), '')) FROM events")
        return cur.fetchone()


def engine(dsn: str, path: Path, **kwargs) -> DataMigrationEngine:
    return DataMigrationEngine(load_spec(path), lambda: psycopg2.connect(dsn), run_by="test", **kwargs)


def test_run_copies_every_row_once_and_verifies(scratch_database, tmp_path, caplog):
    prepare(scratch_database)
    caplog.set_level(logging.INFO)
    result = engine(scratch_database, spec_file(tmp_path), progress_seconds=0).run()
    assert (result.state, result.rows, result.batches) == ("done", ROWS, ROWS // 100)
    assert checksum(scratch_database) == expected_checksum(scratch_database)
    progress = [r.message for r in caplog.records if "rows/s, batches of 100 now, ETA" in r.message]
    # The total is extrapolated from the share of the key range walked: close after one batch, exact at the end.
    first_total = int(re.search(r"/ ~(\d+) rows", progress[0]).group(1))
    assert abs(first_total - ROWS) <= ROWS // 50, progress[0]
    assert "6000 / ~6000 rows (100% of the keys)" in progress[-1]
    again = engine(scratch_database, spec_file(tmp_path)).run()
    assert again.state == "already_done" and checksum(scratch_database)[0] == ROWS


def test_dense_keys_make_batches_of_key_ranges_that_jump_a_hole_at_once(scratch_database, tmp_path, caplog):
    prepare(scratch_database, step=1)
    with psycopg2.connect(scratch_database) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM events WHERE id BETWEEN 2051 AND 2550")  # a hole, as a bulk delete leaves
        cur.execute("ANALYZE events")
    caplog.set_level(logging.INFO)
    result = engine(scratch_database, spec_file(tmp_path)).run()
    # Batches of 100 key values from each batch's first key: 20 before the hole, 2001-2100 (50 rows), then 35 from
    # 2551, none inside the hole. Walking the index would make 55 batches of 100 rows; ranges of 100 key values
    # from the last key, without the jump, 60.
    assert (result.state, result.rows, result.batches) == ("done", ROWS - 500, 56)
    assert checksum(scratch_database) == expected_checksum(scratch_database)
    assert any("a range of that many key values (dense keys)" in r.message for r in caplog.records)


def test_sparse_keys_make_batches_of_that_many_keys_found_in_the_index(scratch_database, tmp_path, caplog):
    prepare(scratch_database, step=3)
    caplog.set_level(logging.INFO)
    result = engine(scratch_database, spec_file(tmp_path)).run()
    # 100 rows per batch though the keys are 3 apart; batches of 100 key values would hold 33 or 34 rows each.
    assert (result.state, result.rows, result.batches) == ("done", ROWS, ROWS // 100)
    assert any("that many keys found by walking the index (sparse keys)" in r.message for r in caplog.records)


def hold_row(dsn: str, key: int):
    """Insert the row ``key`` into events_v2 in a transaction left open: the batch that copies that key waits for it,
    inside its own transaction, until the test rolls the returned connection back (or closes it)."""
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO events_v2 VALUES (%s, 0, 'held by the test', 0)", [key])
    return conn


def batches_committed(pg_sessions, at_least: int) -> tuple:
    return pg_sessions.wait_for(f"the checkpoint to show {at_least} committed batches",
                                "SELECT batches FROM omnisphere_data_migrations WHERE name = 'copy_events' "
                                "AND direction = 'forward' AND batches >= %s", [at_least])


@pytest.mark.parametrize("step", [3, 1], ids=["sparse keys", "dense keys"])
def test_sigkill_at_random_points_never_loses_or_duplicates_a_row(scratch_database, pg_sessions, tmp_path, step):
    """Ten trials: kill the process mid-run, then resume; the result equals an uninterrupted run.

    Where each kill lands is seen in the database, never guessed from time. Even trials kill right after the
    checkpoint shows N committed batches, wherever the process then is (its throttle pause, the next batch's
    statement, its commit). Odd trials kill inside batch N+1's INSERT, with part of the batch written: the test's own
    open transaction inserted one of its rows first, so the batch waits for it (seen in pg_locks) until the kill.
    """
    prepare(scratch_database, step=step)
    # the longest lock wait a spec allows, so that a batch waiting for the test's row does not time out first
    path = spec_file(tmp_path, throttle={"pause_ms": 25}, lock_timeout_ms=10_000)
    expected = expected_checksum(scratch_database)
    batch_size, batch_count = 100, ROWS // 100
    script = ("import sys, psycopg2, pathlib; sys.path.insert(0, sys.argv[3])\n"
              "from omnisphere_release.datamigrate import DataMigrationEngine, load_spec\n"
              "DataMigrationEngine(load_spec(pathlib.Path(sys.argv[2])), lambda: psycopg2.connect(sys.argv[1]),"
              " run_by='doomed').run()\n")
    rng = random.Random(20261125)
    for trial in range(10):
        committed = rng.randrange(1, batch_count - 5)
        with psycopg2.connect(scratch_database) as conn, conn.cursor() as cur:
            cur.execute("TRUNCATE events_v2")
            cur.execute("DROP TABLE IF EXISTS omnisphere_data_migrations")
        held = None
        if trial % 2:  # a row of batch committed + 1 (keys are step, 2 step, ...: batch b holds step * ((b-1)*100 + 1..100))
            held = hold_row(scratch_database, step * (committed * batch_size + rng.randint(1, batch_size)))
        process = subprocess.Popen([sys.executable, "-c", script, scratch_database, str(path), str(REPO / "plugins")])
        try:
            if held:
                pg_sessions.wait_until_waiting("omni-datamigrate copy_events doomed", "transactionid")
            else:
                batches_committed(pg_sessions, committed)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        finally:
            if held:
                held.close()  # rolls the test's row back
        partial = checksum(scratch_database)[0]
        assert partial % batch_size == 0, f"trial {trial}: {partial} rows: a batch was half committed"
        if held:
            assert partial == committed * batch_size, f"trial {trial}: the batch killed mid-statement left rows"
        else:
            assert partial >= committed * batch_size, f"trial {trial}: committed batches were lost"
        # The killed client's session keeps the migration's advisory lock until the server notices it is gone.
        pg_sessions.wait_until_gone("omni-datamigrate copy_events doomed")
        result = engine(scratch_database, path).run()
        # already_done only when an even trial's kill came after the last batch; an odd trial's came inside one
        assert result.state in (("done",) if held else ("done", "already_done"))
        assert checksum(scratch_database) == expected, f"trial {trial}: killed with {partial} rows copied"


def test_pause_request_stops_after_the_current_batch_and_resume_finishes(scratch_database, pg_sessions, tmp_path):
    prepare(scratch_database)
    path = spec_file(tmp_path, throttle={"pause_ms": 20}, lock_timeout_ms=10_000)
    held = hold_row(scratch_database, 3000)  # the last row of the 10th batch: the run stops inside that batch
    outcome = {}

    def first_run() -> None:
        try:
            outcome["first"] = engine(scratch_database, path).run()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["first"] = exc

    worker = threading.Thread(target=first_run)
    worker.start()
    try:
        pg_sessions.wait_until_waiting("omni-datamigrate copy_events test", "transactionid")
        engine(scratch_database, path).request_pause()  # asked while the 10th batch runs
    finally:
        held.close()  # the 10th batch goes on
        worker.join(timeout=60)
    assert not worker.is_alive(), "the run did not stop after the pause request"
    first = outcome["first"]
    assert first.state == "paused" and (first.batches, first.rows) == (10, 1000)
    assert engine(scratch_database, path).status().state == "paused"
    second = engine(scratch_database, path).run()
    assert second.state == "done" and second.resumed_from == 3000
    assert first.rows + second.rows == ROWS
    assert checksum(scratch_database) == expected_checksum(scratch_database)


def test_revert_undoes_and_forgets_the_run(scratch_database, tmp_path):
    prepare(scratch_database)
    path = spec_file(tmp_path)
    engine(scratch_database, path).run()
    assert engine(scratch_database, path).run("revert").state == "done"
    assert checksum(scratch_database)[0] == 0
    assert engine(scratch_database, path).status() is None  # a later release runs it again from the start


def test_failing_verification_is_reported_with_the_checkpoint(scratch_database, tmp_path):
    prepare(scratch_database)
    path = spec_file(tmp_path, verify="SELECT count(*) = 0 FROM events_v2")
    with pytest.raises(MigrationFailed, match="verification returned \\(False,\\)"):
        engine(scratch_database, path).run()
    status = engine(scratch_database, path).status()
    assert status.state == "failed" and status.rows_done == ROWS and "verification" in status.error


def test_failing_batch_keeps_committed_batches_and_resumes_after_the_fix(scratch_database, tmp_path):
    prepare(scratch_database)
    with psycopg2.connect(scratch_database) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO events_v2 VALUES (3000, 0, 'x', 0)")  # a conflicting row in the middle
    path = spec_file(tmp_path)
    with pytest.raises(MigrationFailed, match="failed after key 2700: duplicate key"):
        engine(scratch_database, path).run()
    assert checksum(scratch_database)[0] == 1 + 900  # 9 batches of 100 committed, the 10th rolled back
    with psycopg2.connect(scratch_database) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM events_v2 WHERE id = 3000")
    result = engine(scratch_database, path).run()
    assert result.state == "done" and result.resumed_from == 2700
    assert checksum(scratch_database) == expected_checksum(scratch_database)


def test_unknown_table_and_non_integer_key_are_refused(scratch_database, tmp_path):
    prepare(scratch_database)
    with pytest.raises(InvalidMigrationInput, match="field table: nowhere does not exist"):
        engine(scratch_database, spec_file(tmp_path, table="nowhere")).run()
    with pytest.raises(InvalidMigrationInput, match="field key: events.kind must be an integer column"):
        engine(scratch_database, spec_file(tmp_path, key="kind")).run()


def test_irreversible_spec_refuses_revert(scratch_database, tmp_path):
    prepare(scratch_database)
    path = spec_file(tmp_path, reversible=False, revert=None)
    with pytest.raises(InvalidMigrationInput, match="not reversible"):
        engine(scratch_database, path).run("revert")


def terminate_sessions(dsn: str, application_name: str) -> int:
    """Drop the connections of ``application_name`` as a database restart does (the server ends them: 57P01)."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = %s", [application_name])
        return cur.fetchone()[0]


def test_a_connection_lost_between_batches_is_survived_and_no_row_is_lost_or_copied_twice(
        scratch_database, pg_sessions, tmp_path, caplog):
    prepare(scratch_database)
    path = spec_file(tmp_path, throttle={"pause_ms": 20})
    caplog.set_level(logging.INFO)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=engine(scratch_database, path).run()))
    runner.start()
    try:
        for at_least in (5, 25):  # two drops: the second on a connection the engine opened again
            batches_committed(pg_sessions, at_least)
            assert terminate_sessions(scratch_database, "omni-datamigrate copy_events test") == 1
    finally:
        runner.join(timeout=120)
    assert not runner.is_alive()
    result = outcome["result"]
    assert result.state == "done"
    assert checksum(scratch_database) == expected_checksum(scratch_database)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("data migration copy_events (forward): lost the connection to the database" in w
               for w in warnings) == 2
    assert any("answered again after 2 lost connection(s)" in r.getMessage() for r in caplog.records)
    # Each drop is an outage of its own: the second starts a fresh budget (batches committed in between).
    assert all("(60s of the 60s budget left)" in w for w in warnings)


def test_a_database_gone_for_longer_than_the_budget_fails_and_a_later_run_resumes(scratch_database, pg_sessions,
                                                                                  tmp_path):
    prepare(scratch_database)
    path = spec_file(tmp_path, throttle={"pause_ms": 20})
    connections = []

    def connect_until_the_database_goes_away():
        if connections:  # every reconnect is refused, as by a database that stays down
            raise psycopg2.OperationalError('connection to server at "127.0.0.1" failed: Connection refused')
        connections.append(psycopg2.connect(scratch_database))
        return connections[0]

    doomed = DataMigrationEngine(load_spec(path), connect_until_the_database_goes_away, run_by="test",
                                 reconnect_budget_seconds=3)
    failure: dict = {}

    def run() -> None:
        try:
            doomed.run()
        except MigrationFailed as exc:
            failure["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    try:
        batches_committed(pg_sessions, 5)
        terminate_sessions(scratch_database, "omni-datamigrate copy_events test")
    finally:
        runner.join(timeout=60)
    message = str(failure["error"])
    assert message.startswith("data migration copy_events (forward): lost the connection to the database and could "
                              "not get it back within 3s")
    assert "Connection refused" in message and message.endswith("run it again to resume.")
    committed = checksum(scratch_database)[0]
    assert 500 <= committed < ROWS  # what committed before the loss stays

    result = engine(scratch_database, path).run()

    assert result.state == "done" and result.resumed_from is not None
    assert checksum(scratch_database) == expected_checksum(scratch_database)


def progress_sizes(caplog) -> list[int]:
    return [int(re.search(r"batches of (\d+) now", r.message).group(1)) for r in caplog.records
            if "batches of" in r.message and " now, ETA" in r.message]


def test_fast_batches_grow_to_the_spec_maximum_and_no_further(scratch_database, tmp_path, caplog):
    prepare(scratch_database)
    caplog.set_level(logging.INFO)
    # A target far above what a batch of these rows takes: every batch asks for twice the last, up to the maximum.
    path = spec_file(tmp_path, batch_seconds=5, min_batch_size=50, max_batch_size=400)
    result = engine(scratch_database, path, progress_seconds=0).run()
    assert (result.state, result.smallest_batch, result.largest_batch) == ("done", 100, 400)
    assert result.batches == 2 + (ROWS - 300 + 399) // 400  # 100, 200, then 400 each
    assert max(progress_sizes(caplog)) == 400
    assert checksum(scratch_database) == expected_checksum(scratch_database)


def test_slow_batches_shrink_to_the_spec_minimum_and_no_further(scratch_database, tmp_path):
    prepare(scratch_database, rows=1000)
    # Each batch sleeps 50 ms in the server, five times the target: every batch asks for half the last, down to 50.
    path = spec_file(tmp_path, batch_size=400, batch_seconds=0.01, min_batch_size=50, max_batch_size=400,
                     statement="INSERT INTO events_v2 SELECT id, account, kind, ascii(kind) FROM events WHERE "
                               "id > :last_key AND id <= :upper_key AND (SELECT 1 FROM pg_sleep(0.05)) = 1")
    result = engine(scratch_database, path).run()
    assert (result.state, result.smallest_batch, result.largest_batch) == ("done", 50, 400)
    assert result.batches == 3 + (1000 - 700) // 50  # 400, 200, 100, then 50 each
    assert checksum(scratch_database) == expected_checksum(scratch_database)
