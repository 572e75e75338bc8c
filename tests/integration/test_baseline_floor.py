"""A down below an adopted baseline is refused, on a real PostgreSQL: versions that baseline/adopt recorded without
running them keep their down files unrun, whoever asks (omni-migrate, its plan, a dry run, the engine the DAGs and the
release rollback drive), with the schema, the history and the log unchanged; what this engine applied above the
baseline still reverts, down to the baseline itself; --below-baseline reverts them anyway, on record.

The migrations are tests/fixtures/golang_migrate_set (versions 0, 1, 2, 03, 5), built up to 3 by hand as
run-migrations.sh did, and given to the CLI as auth-service's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg2
import pytest

from omnisphere_release.migrations import EngineSettings, InvalidMigrationInput, MigrationEngine
from omnisphere_release.migrations.__main__ import main as cli
from omnisphere_release.migrations.engine import BELOW_BASELINE_ACTION
from omnisphere_release.migrations.files import discover
from tests.integration.test_adopt import query

pytestmark = pytest.mark.integration
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "golang_migrate_set"
SERVICE = "auth-service"


def state(dsn: str) -> dict[str, list[tuple]]:
    """The service's tables and columns, the history and the migration log: what a refusal must leave as it was."""
    return {
        "schema": query(dsn, "SELECT table_name, column_name, data_type FROM information_schema.columns "
                             "WHERE table_schema = 'public' AND table_name NOT LIKE 'omnisphere_%' ORDER BY 1, 2"),
        "history": query(dsn, "SELECT version, state, checksum_up FROM omnisphere_schema_history ORDER BY version"),
        "log": query(dsn, "SELECT id, version, action FROM omnisphere_schema_log ORDER BY id"),
    }


@pytest.fixture()
def adopted(scratch_database, tmp_path, monkeypatch, capsys):
    """auth-service built by hand up to 3, then `baseline --version 3` through omni-migrate."""
    sql_dir = tmp_path / "sql"
    shutil.copytree(FIXTURE, sql_dir / SERVICE / "migrations")
    for other in ("billing-service", "notification-service"):
        (sql_dir / other / "migrations").mkdir(parents=True)
    monkeypatch.setenv("OMNISPHERE_SQL_DIR", str(sql_dir))
    monkeypatch.setenv("OMNI_PG_DSN_AUTH_SERVICE", scratch_database)
    monkeypatch.delenv("OMNI_AIRFLOW_URL", raising=False)
    for migration in discover(sql_dir / SERVICE / "migrations"):
        if migration.version <= 3:
            query(scratch_database, migration.up.sql)
    assert cli([SERVICE, "baseline", "--version", "3", "--reason", "OPS-7: built by run-migrations.sh"]) == 0
    capsys.readouterr()
    return scratch_database


def engine(dsn: str, folder: Path) -> MigrationEngine:
    return MigrationEngine(SERVICE, folder, lambda: psycopg2.connect(dsn),
                           EngineSettings(lock_timeout_ms=500, lock_retries=0, advisory_lock_wait_seconds=1.0),
                           applied_by="test")


@pytest.mark.parametrize("argv", [
    ["down", "--to", "1"],
    ["down", "--all"],
    ["down"],  # one step down from the baseline itself
    ["plan", "--direction", "down", "--to", "1"],
    ["down", "--to", "1", "--dry-run"],
])
def test_a_down_below_the_baseline_is_refused_naming_it_and_changes_nothing(adopted, capsys, argv):
    before = state(adopted)
    assert cli([SERVICE, *argv, "--reason", "test: below the baseline"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refused: auth-service: "), err
    assert "at or below the baseline 3 (baseline --version 3: OPS-7: built by run-migrations.sh; recorded by cli:" in err
    assert "their down files never ran against this database" in err
    assert "restore the backup taken before" in err and "--below-baseline 'how you checked'" in err
    assert state(adopted) == before
    assert query(adopted, "SELECT to_regclass('namespaces') IS NOT NULL, to_regclass('flags') IS NOT NULL") == [
        (True, True)]


def test_what_this_engine_applied_above_the_baseline_reverts_down_to_the_baseline_itself(adopted, capsys):
    assert cli([SERVICE, "up", "--reason", "test: ours"]) == 0  # 5, applied by this engine
    assert "(version 3 -> 5)" in capsys.readouterr().out
    before = state(adopted)
    assert cli([SERVICE, "down", "--to", "2", "--reason", "test: too far"]) == 2
    err = capsys.readouterr().err
    assert "it would revert 03_namespaces, at or below the baseline 3" in err
    assert "The lowest it can go is version 3 (`down --to 3`)" in err
    assert state(adopted) == before  # not even 5 was reverted

    assert cli([SERVICE, "down", "--to", "3", "--reason", "test: back to the baseline"]) == 0
    assert "Reverted 1 migration(s)" in capsys.readouterr().out
    assert [v for v, _, _ in state(adopted)["history"]] == [0, 1, 2, 3]
    assert cli([SERVICE, "up", "--reason", "test: ours again"]) == 0
    assert cli([SERVICE, "down", "--reason", "test: one step, ours"]) == 0  # the default step is 5, ours
    assert [v for v, _, _ in state(adopted)["history"]] == [0, 1, 2, 3]


def test_the_engine_refuses_it_for_every_caller_and_a_release_rollback_to_the_baseline_passes(adopted, tmp_path):
    """The schema_migrations DAG and the release rollback drive MigrationEngine.migrate/plan: no flag, no way down."""
    eng = engine(adopted, tmp_path / "sql" / SERVICE / "migrations")  # the adopted fixture's folder
    before = state(adopted)
    for call in (lambda: eng.migrate("down", 2, reason="dag"), lambda: eng.migrate("down", 2, dry_run=True),
                 lambda: eng.plan("down", 2)):
        with pytest.raises(InvalidMigrationInput, match=r"down --to 2 refused, nothing was changed: it would revert "
                                                        r"03_namespaces, at or below the baseline 3"):
            call()
    assert state(adopted) == before
    assert eng.migrate("up", reason="release schema_up").versions == [5]
    assert eng.migrate("down", 3, reason="rollback_schema").versions == [5]  # a release's rollback to the baseline
    assert eng.status().current_version == 3


def test_below_baseline_reverts_them_on_record_and_they_are_ours_once_applied_again(adopted, capsys):
    assert cli([SERVICE, "plan", "--direction", "down", "--to", "1", "--below-baseline", "checked: same files"]) == 0
    out = capsys.readouterr().out
    assert "below the baseline, accepted: 3, 2 were recorded by baseline/adopt without running them " \
           "(checked: same files)" in out
    assert cli([SERVICE, "down", "--to", "1", "--below-baseline", " ", "--reason", "x"]) == 2
    assert "--below-baseline goes with down" in capsys.readouterr().err
    assert cli([SERVICE, "up", "--below-baseline", "x", "--reason", "x"]) == 2

    assert cli([SERVICE, "down", "--to", "1", "--reason", "OPS-8: redo 2 and 3",
                "--below-baseline", "the golang-migrate down files are these, checked with \\d"]) == 0
    assert "Reverted 2 migration(s)" in capsys.readouterr().out
    assert query(adopted, "SELECT to_regclass('namespaces')") == [(None,)]
    assert query(adopted, "SELECT version, action, reason FROM omnisphere_schema_log WHERE id > 4 ORDER BY id") == [
        (3, BELOW_BASELINE_ACTION, "the golang-migrate down files are these, checked with \\d"),
        (2, BELOW_BASELINE_ACTION, "the golang-migrate down files are these, checked with \\d"),
        (3, "reverted", "OPS-8: redo 2 and 3"),
        (2, "reverted", "OPS-8: redo 2 and 3")]

    # Applied again by this engine, 2 and 3 are its own: they revert without the flag; 0 and 1 still need it.
    assert cli([SERVICE, "up", "--to", "3", "--reason", "test: redo"]) == 0
    assert cli([SERVICE, "down", "--to", "1", "--reason", "test: ours now"]) == 0
    assert cli([SERVICE, "down", "--to", "0", "--reason", "test: 1 is not ours"]) == 2
    assert "it would revert 1_variants, at or below the baseline 1" in capsys.readouterr().err


def test_an_adopted_baseline_is_named_with_its_source(scratch_database, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "migrations"
    shutil.copytree(FIXTURE, folder)
    for migration in discover(folder):
        if migration.version <= 2:
            query(scratch_database, migration.up.sql)
    query(scratch_database, "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean "
                            "NOT NULL); INSERT INTO schema_migrations VALUES (2, false)")
    eng = engine(scratch_database, folder)
    assert eng.adopt("OPS-9: from run-migrations.sh").recorded == [0, 1, 2]
    with pytest.raises(InvalidMigrationInput, match=r"down --all refused, nothing was changed: it would revert "
                                                    r"2_segments_match_type, 1_variants, 0_initial, at or below the "
                                                    r"baseline 2 \(golang-migrate's schema_migrations \(version 2, "
                                                    r"clean\): OPS-9: from run-migrations.sh; recorded by test at "):
        eng.migrate("down", -1, reason="x")
    assert [v for v, _, _ in state(scratch_database)["history"]] == [0, 1, 2]
