"""Discovery and validation of migration files: every bad file is named before the database is touched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from omnisphere_release.migrations.files import MigrationFileError, discover, new_migration, split_statements
from omnisphere_release.migrations.lint import KNOWN_RULES, lint, squawk_executable

REPO = Path(__file__).resolve().parents[2]


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    write(tmp_path, "001_create_items.up.sql", "CREATE TABLE items (id bigint PRIMARY KEY);\n")
    write(tmp_path, "001_create_items.down.sql", "DROP TABLE items;\n")
    return tmp_path


@pytest.mark.parametrize("service", ["auth-service", "billing-service", "notification-service"])
def test_project_migrations_are_valid_and_reversible(service):
    migrations = discover(REPO / "include" / "sql" / service / "migrations")
    assert len(migrations) >= 3
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert all(m.reversible for m in migrations)


def test_versions_are_sorted_numerically_and_checksummed(folder):
    write(folder, "010_add_items_name.up.sql", "ALTER TABLE items ADD COLUMN name text;")
    write(folder, "010_add_items_name.down.sql", "ALTER TABLE items DROP COLUMN name;")
    write(folder, "002_add_items_price.up.sql", "ALTER TABLE items ADD COLUMN price bigint;")
    write(folder, "002_add_items_price.down.sql", "ALTER TABLE items DROP COLUMN price;")
    migrations = discover(folder)
    assert [m.version for m in migrations] == [1, 2, 10]
    assert len({m.up.checksum for m in migrations}) == 3


def test_duplicate_version_names_both_files(folder):
    write(folder, "001_other.up.sql", "SELECT 1;")
    with pytest.raises(MigrationFileError, match=r"001_other.up.sql: duplicate version 1 \(also 001_create_items.up.sql\)"):
        discover(folder)


def test_down_without_up_is_refused(folder):
    path = write(folder, "002_orphan.down.sql", "SELECT 1;")
    with pytest.raises(MigrationFileError, match=f"{path}: down file without an up file"):
        discover(folder)


def test_up_without_down_must_declare_itself_irreversible(folder):
    path = write(folder, "002_drop_legacy.up.sql", "DROP TABLE IF EXISTS legacy;")
    with pytest.raises(MigrationFileError, match=f"{path}: no down file 002_drop_legacy.down.sql"):
        discover(folder)
    write(folder, "002_drop_legacy.up.sql", "-- omni:irreversible the legacy rows are gone for good\nDROP TABLE IF EXISTS legacy;")
    migration = discover(folder)[1]
    assert not migration.reversible
    assert migration.irreversible_reason == "the legacy rows are gone for good"


def test_non_utf8_file_is_refused(folder):
    path = write(folder, "002_latin1.up.sql", "INSERT INTO items VALUES (1); -- caf\xe9".encode("latin-1"))
    write(folder, "002_latin1.down.sql", "DELETE FROM items;")
    with pytest.raises(MigrationFileError, match=f"{path}: not UTF-8"):
        discover(folder)


def test_empty_or_comment_only_file_is_refused(folder):
    path = write(folder, "002_nothing.up.sql", "-- TODO\n/* later */\n")
    write(folder, "002_nothing.down.sql", "SELECT 1;")
    with pytest.raises(MigrationFileError, match=f"{path}: contains no SQL statement"):
        discover(folder)


def test_bad_file_name_is_refused(folder):
    path = write(folder, "2-add-things.sql", "SELECT 1;")
    with pytest.raises(MigrationFileError, match=f"{path}: not a migration file name"):
        discover(folder)


def test_unknown_directive_and_lint_ignore_without_reason_are_refused(folder):
    write(folder, "002_x.up.sql", "-- omni:no-transactoin\nSELECT 1;")
    write(folder, "002_x.down.sql", "SELECT 1;")
    with pytest.raises(MigrationFileError, match="unknown directive 'omni:no-transactoin'"):
        discover(folder)
    write(folder, "002_x.up.sql", "-- omni:lint-ignore changing-column-type\nSELECT 1;")
    with pytest.raises(MigrationFileError, match="needs a rule and a reason"):
        discover(folder)


def test_no_transaction_file_is_split_into_statements(folder):
    write(folder, "002_idx.up.sql", "-- omni:no-transaction\nCREATE INDEX CONCURRENTLY a ON items (id);\n"
                                    "CREATE INDEX CONCURRENTLY b ON items (id); -- trailing comment\n")
    write(folder, "002_idx.down.sql", "-- omni:no-transaction\nDROP INDEX CONCURRENTLY a;")
    migration = discover(folder)[1]
    assert migration.up.no_transaction
    assert len(split_statements(migration.up.sql)) == 2


def test_lint_blocks_locking_statements_and_honours_ignores(folder):
    write(folder, "002_idx.up.sql", "CREATE INDEX items_id_idx ON items (id);")
    write(folder, "002_idx.down.sql", "DROP INDEX items_id_idx;")
    write(folder, "003_type.up.sql", "-- omni:lint-ignore changing-column-type items is empty in every environment\n"
                                     "ALTER TABLE items ALTER COLUMN id TYPE numeric;")
    write(folder, "003_type.down.sql", "ALTER TABLE items ALTER COLUMN id TYPE bigint;")
    write(folder, "004_flag.up.sql", "ALTER TABLE items ADD COLUMN flag char(1);")
    write(folder, "004_flag.down.sql", "ALTER TABLE items DROP COLUMN flag;")
    findings = lint(discover(folder)[1:])
    by_rule = {f.rule: f for f in findings}
    assert by_rule["require-concurrent-index-creation"].severity == "blocking"
    assert by_rule["require-concurrent-index-creation"].version == 2
    assert by_rule["changing-column-type"].severity == "ignored"
    assert by_rule["changing-column-type"].ignore_reason == "items is empty in every environment"
    assert by_rule["ban-char-field"].severity == "advice"
    # The engine sets both timeouts itself: squawk is not asked about them.
    assert not {"require-lock-timeout", "require-statement-timeout"} & set(by_rule)


def test_project_migrations_pass_lint():
    for service in ("auth-service", "billing-service", "notification-service"):
        findings = lint(discover(REPO / "include" / "sql" / service / "migrations"))
        assert [f.describe() for f in findings if f.severity == "blocking"] == []


@pytest.mark.parametrize(("existing", "expected"), [
    (["001_a", "004_b"], "005_add_users_email"),  # the project's three digits
    (["0_initial", "9_b", "16_c"], "17_add_users_email"),  # golang-migrate's unpadded numbers
    (["0_initial"], "1_add_users_email"),
    (["0_initial", "7_b", "008_c"], "009_add_users_email"),  # the newest file's padding wins
    (["099_z"], "100_add_users_email"),
    ([], "001_add_users_email"),
])
def test_new_follows_the_padding_of_the_newest_file(tmp_path, existing, expected):
    for label in existing:
        write(tmp_path, f"{label}.up.sql", "SELECT 1;")
        write(tmp_path, f"{label}.down.sql", "SELECT 1;")
    up, down = new_migration(tmp_path, "add_users_email")
    assert (up.name, down.name) == (f"{expected}.up.sql", f"{expected}.down.sql")


def test_new_writes_templates_that_must_be_filled_before_they_can_run(folder):
    up, down = new_migration(folder, "add_items_name")
    assert "no-transaction" in up.read_text() and "lint-ignore <rule> <reason>" in up.read_text()
    assert "undo exactly what 002_add_items_name.up.sql does" in down.read_text()
    with pytest.raises(MigrationFileError, match="002_add_items_name.up.sql: contains no SQL statement"):
        discover(folder)  # the template's directive lines are comments, not directives
    up.write_text(up.read_text() + "ALTER TABLE items ADD COLUMN name text;\n")
    down.write_text(down.read_text() + "ALTER TABLE items DROP COLUMN name;\n")
    migration = discover(folder)[1]
    assert migration.label == "002_add_items_name" and not migration.up.no_transaction


def test_new_refuses_a_bad_name_and_writes_nothing(folder):
    with pytest.raises(MigrationFileError, match=r"'Add Users-Email'.*e.g. 'add_users_email'"):
        new_migration(folder, "Add Users-Email")
    assert sorted(p.name for p in folder.iterdir()) == ["001_create_items.down.sql", "001_create_items.up.sql"]


def test_padded_and_unpadded_names_of_one_version_are_one_version(folder):
    write(folder, "1_other.up.sql", "SELECT 1;")
    with pytest.raises(MigrationFileError, match=r"1_other.up.sql: duplicate version 1 \(also 001_create_items"):
        discover(folder)


def test_lint_names_the_table_each_finding_locks(folder):
    write(folder, "002_idx.up.sql", "-- items get looked up by name\nCREATE INDEX items_name_idx ON public.Items (name);\n"
                                    'ALTER TABLE ONLY "Odd" ADD CONSTRAINT c CHECK (id > 0);')
    write(folder, "002_idx.down.sql", "DROP INDEX items_name_idx;")
    findings = {f.rule: f for f in lint(discover(folder)[1:], relation_rows=lambda name: True if name == "public.items" else None)}
    assert findings["require-concurrent-index-creation"].table == "public.items"
    assert findings["require-concurrent-index-creation"].severity == "blocking"
    assert findings["constraint-missing-not-valid"].table == '"Odd"'
    assert findings["constraint-missing-not-valid"].why == '"Odd" does not exist before this plan'


def test_every_rule_the_lint_knows_is_a_rule_of_the_installed_squawk(tmp_path):
    sample = write(tmp_path, "sample.sql", "SELECT 1;")
    unknown = [rule for rule in sorted(KNOWN_RULES)
               if subprocess.run([squawk_executable(), "--reporter", "json", f"--include={rule}", str(sample)],
                                 capture_output=True, check=False).returncode == 2]
    assert unknown == []
