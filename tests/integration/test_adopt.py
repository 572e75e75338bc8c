"""Adopting databases other tools built, against real PostgreSQL: baseline, adopt from golang-migrate's table,
version 0, padded and unpadded numbers, gaps, and a lint that blocks only locks on tables that hold rows.

tests/fixtures/golang_migrate_set is written like a long-shipped golang-migrate set (``0_initial``, unpadded numbers
with one padded ``03``, a gap at 4, varchar and timestamp columns, constraints added to tables of the same set).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg2
import pytest

from omnisphere_release.migrations import EngineSettings, InvalidMigrationInput, MigrationEngine
from omnisphere_release.migrations.__main__ import main as cli
from omnisphere_release.migrations.engine import NOTHING_APPLIED
from omnisphere_release.migrations.files import discover

pytestmark = pytest.mark.integration
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "golang_migrate_set"
GOLANG_TABLE = "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL)"


def query(dsn: str, sql: str, params=None):
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else None


def golang_migrate_table(dsn: str, rows: list[tuple[int, bool]]) -> None:
    """Create golang-migrate's table as golang-migrate does, holding ``rows``."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(GOLANG_TABLE)
        cur.executemany("INSERT INTO schema_migrations (version, dirty) VALUES (%s, %s)", rows)


def history(dsn: str) -> list[tuple[int, str]]:
    if query(dsn, "SELECT to_regclass('omnisphere_schema_history')") == [(None,)]:
        return []
    return query(dsn, "SELECT version, checksum_up FROM omnisphere_schema_history ORDER BY version")


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    target = tmp_path / "migrations"
    shutil.copytree(FIXTURE, target)
    return target


def make_engine(dsn: str, folder: Path, **settings) -> MigrationEngine:
    return MigrationEngine("flags-service", folder, lambda: psycopg2.connect(dsn),
                           EngineSettings(lock_timeout_ms=500, lock_retries=0, advisory_lock_wait_seconds=1.0,
                                          **settings), applied_by="test")


def build_by_hand(dsn: str, folder: Path, upto: int) -> None:
    """Run the up files up to ``upto`` as run-migrations.sh did: the schema, and no history of this engine."""
    for migration in discover(folder):
        if migration.version <= upto:
            query(dsn, migration.up.sql)


# ---- version 0, padding, gaps ----------------------------------------------------------------------------------------
def test_version_0_is_a_version_and_nothing_applied_is_none(scratch_database, folder):
    engine = make_engine(scratch_database, folder)
    status = engine.status()
    assert status.current_version == NOTHING_APPLIED and "flags-service: version none, 0 applied" in status.render()
    plan = engine.plan("up")
    assert [m.label for m in plan.steps] == ["0_initial", "1_variants", "2_segments_match_type", "03_namespaces",
                                             "5_flag_type"]  # padded and unpadded, in numeric order
    text = plan.render(with_sql=False)
    assert "version none -> 5" in text
    assert "gap: no migration numbered 4 (between 3 and 5_flag_type)" in text
    assert engine.migrate("up", reason="install").versions == [0, 1, 2, 3, 5]

    down = engine.migrate("down", target=0, reason="keep 0")
    assert down.versions == [5, 3, 2, 1] and down.to_version == 0
    assert engine.status().current_version == 0 and "version 0, 1 applied" in engine.status().render()
    assert query(scratch_database, "SELECT to_regclass('flags') IS NOT NULL") == [(True,)]  # 0_initial kept
    last = engine.migrate("down", reason="the last one")  # one step down from 0: nothing applied
    assert last.versions == [0] and "(version 0 -> none)" in last.summary()
    assert engine.status().current_version == NOTHING_APPLIED and history(scratch_database) == []


def test_down_all_reverts_version_0_too_and_to_a_pending_version_is_refused(scratch_database, folder):
    engine = make_engine(scratch_database, folder)
    engine.migrate("up", target=2, reason="install")
    with pytest.raises(InvalidMigrationInput, match=r"target version 3 is above the current version 2"):
        engine.migrate("down", target=3)
    assert engine.migrate("down", NOTHING_APPLIED, reason="start again").versions == [2, 1, 0]
    assert query(scratch_database, "SELECT to_regclass('flags')") == [(None,)]


# ---- lint that fits real migrations --------------------------------------------------------------------------------
def test_a_fresh_install_of_the_set_blocks_on_nothing_and_advises_on_style(scratch_database, folder):
    plan = make_engine(scratch_database, folder).plan("up")
    assert plan.blocking == []
    rules = {f.rule for f in plan.findings}
    assert {"prefer-timestamp-tz", "prefer-text-field", "prefer-bigint-over-int", "adding-foreign-key-constraint",
            "constraint-missing-not-valid", "require-concurrent-index-creation"} <= rules
    fk = next(f for f in plan.findings if f.rule == "adding-foreign-key-constraint")
    assert fk.table == "flags" and fk.why == "flags is created earlier in this plan: it holds no rows yet"


def test_locks_block_only_on_tables_that_hold_rows(scratch_database, folder):
    engine = make_engine(scratch_database, folder)
    engine.migrate("up", target=2, reason="install")
    empty = engine.plan("up")
    assert empty.blocking == [] and any(f.why == "flags is empty" for f in empty.findings)

    query(scratch_database, "INSERT INTO flags (key, name, description) VALUES ('dark-mode', 'Dark mode', '')")
    blocking = engine.plan("up").blocking
    assert sorted((f.version, f.rule) for f in blocking) == [
        (3, "adding-foreign-key-constraint"), (3, "constraint-missing-not-valid"),
        (5, "require-concurrent-index-creation")]
    assert all(f.table == "flags" and f.why == "flags holds rows" for f in blocking)
    with pytest.raises(InvalidMigrationInput, match=r"03_namespaces.up.sql:10: adding-foreign-key-constraint"):
        engine.migrate("up", reason="refused")
    assert engine.status().current_version == 2


def test_the_service_chooses_its_blocking_rules(scratch_database, folder):
    strict = make_engine(scratch_database, folder, blocking_rules=("prefer-timestamp-tz",))
    blocking = strict.plan("up").blocking
    assert blocking and {f.rule for f in blocking} == {"prefer-timestamp-tz"}  # style blocks when chosen, locks not
    with pytest.raises(InvalidMigrationInput, match=r"unknown squawk rule\(s\) prefer-timestamptz"):
        make_engine(scratch_database, folder, blocking_rules=("prefer-timestamptz",)).plan("up")


# ---- baseline ------------------------------------------------------------------------------------------------------
def test_baseline_records_without_running_and_a_second_run_changes_nothing(scratch_database, folder):
    build_by_hand(scratch_database, folder, upto=2)
    engine = make_engine(scratch_database, folder)
    dry = engine.baseline(2, "checked by hand", dry_run=True)
    assert dry.recorded == [0, 1, 2] and history(scratch_database) == []
    result = engine.baseline(2, "built by run-migrations.sh, checked with \\d")
    assert result.recorded == [0, 1, 2]
    files = {m.version: m.up.checksum for m in discover(folder)}
    assert history(scratch_database) == [(v, files[v]) for v in (0, 1, 2)]
    log = query(scratch_database, "SELECT version, action, reason FROM omnisphere_schema_log ORDER BY id")
    assert log == [(v, "baselined", "baseline --version 2: built by run-migrations.sh, checked with \\d")
                   for v in (0, 1, 2)]
    assert engine.baseline(2, "again").recorded == []
    assert "baseline 2" in engine.status().render()
    assert engine.migrate("up", reason="the rest").versions == [3, 5]  # 0-2 are not run again


@pytest.mark.parametrize(("setup", "version", "message"), [
    (lambda e: e.migrate("up", target=3, reason="x"), 2, r"records version 3 \(namespaces\) applied by test .* above 2"),
    (lambda e: e.migrate("up", target=1, reason="x"), 3,
     r"records version\(s\) up to 1 .* would mark 2_segments_match_type, 03_namespaces applied without running them"),
    (lambda e: None, 4, r"no migration file numbered 4 .*known versions: 0, 1, 2, 3, 5"),
])
def test_baseline_that_disagrees_with_the_history_is_refused_and_changes_nothing(scratch_database, folder, setup,
                                                                                  version, message):
    engine = make_engine(scratch_database, folder)
    setup(engine)
    before = history(scratch_database)
    with pytest.raises(InvalidMigrationInput, match=message):
        engine.baseline(version, "disagrees")
    assert history(scratch_database) == before


def test_baseline_of_a_changed_file_is_refused(scratch_database, folder):
    engine = make_engine(scratch_database, folder)
    engine.migrate("up", target=1, reason="x")
    (folder / "1_variants.up.sql").write_text((folder / "1_variants.up.sql").read_text() + "\n-- edited\n")
    with pytest.raises(InvalidMigrationInput, match=r"1_variants.up.sql differs from the file recorded"):
        engine.baseline(1, "edited")


def test_files_at_or_below_the_baseline_are_never_linted_again(scratch_database, folder):
    build_by_hand(scratch_database, folder, upto=3)
    engine = make_engine(scratch_database, folder)
    engine.baseline(3, "adopted")
    query(scratch_database, "INSERT INTO flags (key, name, description) VALUES ('dark-mode', 'Dark mode', '')")
    assert engine.migrate("down", target=2, reason="redo 03",
                          below_baseline="03's down file undoes what build_by_hand ran").versions == [3]
    plan = engine.plan("up")
    assert [m.version for m in plan.steps] == [3, 5]
    assert {f.version for f in plan.findings} == {5}  # 03 would block on flags: it is below the baseline


# ---- adopt golang-migrate's table ----------------------------------------------------------------------------------
def test_adopt_reads_golang_migrate_and_leaves_its_table_as_it_was(scratch_database, folder):
    build_by_hand(scratch_database, folder, upto=3)
    golang_migrate_table(scratch_database, [(3, False)])
    result = make_engine(scratch_database, folder).adopt("run-migrations.sh built it")
    assert (result.version, result.recorded) == (3, [0, 1, 2, 3])
    assert query(scratch_database, "SELECT version, dirty FROM schema_migrations") == [(3, False)]
    assert "golang-migrate's schema_migrations (version 3, clean)" in query(
        scratch_database, "SELECT reason FROM omnisphere_schema_log LIMIT 1")[0][0]


@pytest.mark.parametrize(("rows", "message"), [
    (None, r"the database has no table schema_migrations, .*baseline --version N"),
    ("rails", r"is not golang-migrate's table"),
    ([(3, True)], r"golang-migrate's schema_migrations says version 3 is dirty.*force 3"),
    ([(2, False), (3, False)], r"holds 2 rows"),
])
def test_adopt_refuses_what_it_cannot_trust_and_changes_nothing(scratch_database, folder, rows, message):
    if rows == "rails":  # another tool's table of the same name
        query(scratch_database, "CREATE TABLE schema_migrations (version varchar(255) PRIMARY KEY)")
    elif rows is not None:
        golang_migrate_table(scratch_database, rows)
    with pytest.raises(InvalidMigrationInput, match=message):
        make_engine(scratch_database, folder).adopt("try")
    assert history(scratch_database) == []


def test_adopt_of_an_empty_golang_migrate_table_records_nothing(scratch_database, folder):
    golang_migrate_table(scratch_database, [])
    result = make_engine(scratch_database, folder).adopt("fresh database")
    assert result.recorded == [] and result.version == NOTHING_APPLIED and history(scratch_database) == []


def test_cli_baseline_adopt_and_down_all(scratch_database, folder, monkeypatch, tmp_path, capsys):
    """The CLI through a catalog whose auth-service points at the fixture set."""
    sql_dir = tmp_path / "sql"
    shutil.copytree(folder, sql_dir / "auth-service" / "migrations")
    for other in ("billing-service", "notification-service"):
        (sql_dir / other / "migrations").mkdir(parents=True)
    monkeypatch.setenv("OMNISPHERE_SQL_DIR", str(sql_dir))
    monkeypatch.setenv("OMNI_PG_DSN_AUTH_SERVICE", scratch_database)
    build_by_hand(scratch_database, folder, upto=2)
    golang_migrate_table(scratch_database, [(2, True)])
    assert cli(["auth-service", "adopt", "--reason", "dirty"]) == 2
    assert "says version 2 is dirty" in capsys.readouterr().err
    assert cli(["auth-service", "adopt"]) == 2 and "--reason" in capsys.readouterr().err
    assert cli(["all", "baseline", "--version", "2", "--reason", "x"]) == 2
    assert cli(["auth-service", "baseline", "--version", "2", "--reason", "checked by hand"]) == 0
    assert "recorded 3 version(s) as applied without running them (0, 1, 2)" in capsys.readouterr().out
    assert cli(["auth-service", "status"]) == 0 and "version 2, 3 applied, 2 pending, baseline 2" in \
        capsys.readouterr().out
    assert cli(["auth-service", "down", "--all", "--to", "1", "--reason", "x"]) == 2
    assert cli(["auth-service", "down", "--all", "--reason", "drop it all"]) == 2  # all of it is below the baseline
    assert "at or below the baseline 2 (baseline --version 2: checked by hand;" in capsys.readouterr().err
    assert cli(["auth-service", "down", "--all", "--reason", "drop it all",
                "--below-baseline", "the fixture's down files undo what build_by_hand ran"]) == 0
    assert "(version 2 -> none)" in capsys.readouterr().out
    assert history(scratch_database) == [] and query(scratch_database, "SELECT to_regclass('flags')") == [(None,)]
