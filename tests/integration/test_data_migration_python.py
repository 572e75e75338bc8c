"""A Python data migration (the guide's old_users -> new_users) in the engine's frame, against real PostgreSQL: the
same batches, checkpoint and resume as a SQL spec, after a failed batch, a failing function and a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest
import yaml

from omnisphere_release.datamigrate import DataMigrationEngine, load_spec
from omnisphere_release.migrations import MigrationFailed

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
USERS = 2000
APP = "omni-datamigrate copy_users"


def prepare(dsn: str) -> None:
    """old_users as a real one is: gaps in the ids, e-mails in any case with spaces, a name part sometimes missing."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE old_users (id bigint PRIMARY KEY, email text, first_name text, last_name text, "
                    "created_at timestamptz NOT NULL)")
        cur.execute("CREATE TABLE new_users (id bigint PRIMARY KEY, email text NOT NULL, full_name text NOT NULL, "
                    "created_at timestamptz NOT NULL)")
        cur.execute("INSERT INTO old_users SELECT g * 2, '  User' || g || '@Example.COM ', "
                    "CASE WHEN g %% 7 = 0 THEN NULL ELSE ' Ada' || g END, CASE WHEN g %% 5 = 0 THEN '' ELSE 'Lovelace' "
                    "END, timestamptz '2020-01-01' + g * interval '1 minute' FROM generate_series(1, %s) g", [USERS])


def spec_file(folder: Path, **overrides) -> Path:
    data = {
        "description": "copy users from old_users into new_users (the migration guide's example)",
        "table": "old_users", "key": "id", "batch_size": 100,
        "python": "datamigrations.users:copy_users",
        "verify": "SELECT (SELECT count(*) FROM old_users) = (SELECT count(*) FROM new_users)",
        "reversible": True,
        "revert": "DELETE FROM new_users WHERE id > :last_key AND id <= :upper_key",
        **overrides,
    }
    path = folder / "copy_users.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def engine(dsn: str, path: Path, **kwargs) -> DataMigrationEngine:
    return DataMigrationEngine(load_spec(path), lambda: psycopg2.connect(dsn), run_by="test", **kwargs)


def copied(dsn: str) -> tuple[int, str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), md5(coalesce(string_agg(id || '|' || email || '|' || full_name || '|' || "
                    "created_at, ',' ORDER BY id), '')) FROM new_users")
        return cur.fetchone()


def expected(dsn: str) -> tuple[int, str]:
    """What the copy must give, computed by SQL from old_users (not by the function under test)."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), md5(coalesce(string_agg(id || '|' || lower(btrim(email)) || '|' || "
                    "concat_ws(' ', nullif(btrim(first_name), ''), nullif(btrim(last_name), '')) || '|' || created_at, "
                    "',' ORDER BY id), '')) FROM old_users")
        return cur.fetchone()


def checkpoint(dsn: str) -> tuple:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT state, last_key, rows_done, batches, error FROM omnisphere_data_migrations "
                    "WHERE name = 'copy_users' AND direction = 'forward'")
        return cur.fetchone()


def test_the_guide_example_copies_every_user_once_then_reverts(scratch_database, tmp_path):
    prepare(scratch_database)
    path = spec_file(tmp_path)  # adaptive sizes from 100 keys, within the default [10, 1000]
    result = engine(scratch_database, path).run()
    assert (result.state, result.rows) == ("done", USERS)
    assert 10 <= result.smallest_batch <= result.largest_batch <= 1000
    assert copied(scratch_database) == expected(scratch_database)
    assert checkpoint(scratch_database)[:4] == ("done", 2 * USERS, USERS, result.batches)
    assert engine(scratch_database, path).run().state == "already_done"

    assert engine(scratch_database, path).run("revert").state == "done"
    assert copied(scratch_database)[0] == 0 and engine(scratch_database, path).status() is None


def test_a_failed_batch_keeps_the_committed_ones_and_the_next_run_resumes_after_them(scratch_database, tmp_path):
    prepare(scratch_database)
    with psycopg2.connect(scratch_database) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO new_users VALUES (1100, 'taken', 'x', now())")  # a row of the 6th batch is taken
    path = spec_file(tmp_path, batch_seconds=0)  # every batch 100 keys: ids 2..200, 202..400, ...
    with pytest.raises(MigrationFailed, match="copy_users failed after key 1000: duplicate key value"):
        engine(scratch_database, path).run()
    state, last_key, rows_done, batches, error = checkpoint(scratch_database)
    assert (state, last_key, rows_done, batches) == ("failed", 1000, 500, 5) and "duplicate key" in error
    assert copied(scratch_database)[0] == 500 + 1  # 5 batches committed, the 6th rolled back whole

    with psycopg2.connect(scratch_database) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM new_users WHERE id = 1100")
    result = engine(scratch_database, path).run()
    assert (result.state, result.resumed_from, result.rows) == ("done", 1000, USERS - 500)
    assert copied(scratch_database) == expected(scratch_database)


def test_a_function_that_raises_fails_the_batch_naming_its_range_and_a_fixed_run_resumes(scratch_database, tmp_path):
    prepare(scratch_database)
    with psycopg2.connect(scratch_database) as conn, conn.cursor() as cur:
        cur.execute("UPDATE old_users SET email = NULL WHERE id = 1500")  # the function cannot lower-case None
    path = spec_file(tmp_path, batch_seconds=0)
    with pytest.raises(MigrationFailed, match=r"copy_users failed after key 1400: datamigrations.users:copy_users "
                                              r"for keys 1400 < id <= 1600 raised AttributeError: .*strip"):
        engine(scratch_database, path).run()
    assert checkpoint(scratch_database)[:3] == ("failed", 1400, 700)
    assert copied(scratch_database)[0] == 700

    with psycopg2.connect(scratch_database) as conn, conn.cursor() as cur:
        cur.execute("UPDATE old_users SET email = 'user750@example.com' WHERE id = 1500")
    result = engine(scratch_database, path).run()
    assert (result.state, result.resumed_from) == ("done", 1400)
    assert copied(scratch_database) == expected(scratch_database)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(scratch_database, pg_sessions, tmp_path):
    prepare(scratch_database)
    path = spec_file(tmp_path, batch_seconds=0, throttle={"pause_ms": 20})
    script = ("import sys, psycopg2, pathlib\n"
              "from omnisphere_release.datamigrate import DataMigrationEngine, load_spec\n"
              "DataMigrationEngine(load_spec(pathlib.Path(sys.argv[2])), lambda: psycopg2.connect(sys.argv[1]),"
              " run_by='doomed').run()\n")
    # The process an Airflow worker would be: the plugins folder on the path, include/ found by the engine itself.
    process = subprocess.Popen([sys.executable, "-c", script, scratch_database, str(path)],
                               env={**os.environ, "PYTHONPATH": str(REPO / "plugins")})
    try:
        pg_sessions.wait_for("the checkpoint to show 7 committed batches",
                             "SELECT batches FROM omnisphere_data_migrations WHERE name = 'copy_users' "
                             "AND batches >= 7")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    partial = copied(scratch_database)[0]
    assert 700 <= partial < USERS and partial % 100 == 0, f"{partial} rows: a batch was half committed"
    pg_sessions.wait_until_gone(f"{APP} doomed")  # its session holds the migration's advisory lock until it ends

    result = engine(scratch_database, path).run()
    assert result.state == "done" and result.resumed_from == 2 * partial
    assert copied(scratch_database) == expected(scratch_database)


def test_a_function_that_commits_is_stopped(scratch_database, tmp_path, monkeypatch):
    """The engine commits a batch's rows with its checkpoint; a function committing on its own breaks that."""
    prepare(scratch_database)
    package = tmp_path / "include" / "dm_commits"
    package.mkdir(parents=True)
    (tmp_path / "include" / "sql").mkdir()
    (package / "__init__.py").write_text("")
    (package / "users.py").write_text("from datamigrations.users import copy_users\n\n\n"
                                      "def copy_and_commit(conn, last_key, upper_key):\n"
                                      "    copied = copy_users(conn, last_key, upper_key)\n"
                                      "    conn.commit()\n"
                                      "    return copied\n")
    monkeypatch.setenv("OMNISPHERE_SQL_DIR", str(tmp_path / "include" / "sql"))
    monkeypatch.setattr(sys, "path", [*sys.path, str(REPO / "include")])
    path = spec_file(tmp_path, python="dm_commits.users:copy_and_commit", batch_seconds=0)
    with pytest.raises(MigrationFailed, match=r"dm_commits.users:copy_and_commit for keys 1 < id <= 200 committed, "
                                              r"rolled back or left the batch's transaction; it must not"):
        engine(scratch_database, path).run()
    assert checkpoint(scratch_database)[:3] == ("failed", 1, 0)  # the checkpoint never counted what it committed
