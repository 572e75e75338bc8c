"""A spec that names a Python function: refused before any batch runs (naming the file and the field) when the
function cannot be imported or called; found in the include folder the same way in production as here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from omnisphere_release.datamigrate import DataMigrationEngine, DataSpecError, load_function, load_spec

REPO = Path(__file__).resolve().parents[2]
GOOD = {
    "table": "old_users", "key": "id", "batch_size": 100,
    "python": "datamigrations.users:copy_users",
    "verify": "SELECT true", "reversible": True,
    "revert": "DELETE FROM new_users WHERE id > :last_key AND id <= :upper_key",
}
MODULE = '''
import asyncio

NOT_A_FUNCTION = 3


def one_argument(conn):
    return 0


def keyword_only(conn, *, last_key, upper_key):
    return 0


async def copy_async(conn, last_key, upper_key):
    return 0


def copy(conn, last_key, upper_key, batch_size=None):
    return 0
'''


@pytest.fixture()
def include(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An include folder of the test's own (OMNISPHERE_SQL_DIR = <it>/sql) with a package of a unique name."""
    package = f"dm_{uuid.uuid4().hex[:12]}"
    (tmp_path / "sql").mkdir()
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "batches.py").write_text(MODULE)
    (tmp_path / package / "broken.py").write_text("import a_library_the_image_does_not_have\n")
    monkeypatch.setenv("OMNISPHERE_SQL_DIR", str(tmp_path / "sql"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the engine appends the include folder: undone after the test
    yield package
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


def write(folder: Path, data: dict) -> Path:
    path = folder / "copy_users.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


def test_the_guide_example_is_found_in_the_include_folder_beside_the_sql_tree(tmp_path):
    function = load_function(load_spec(write(tmp_path, GOOD)), "python")
    assert function.__name__ == "copy_users"
    assert Path(sys.modules[function.__module__].__file__) == REPO / "include" / "datamigrations" / "users.py"


def test_the_function_imports_in_the_production_layout_with_only_the_plugins_folder_on_the_path(tmp_path):
    """As in the image: /opt/airflow/{plugins,include}, PYTHONPATH=plugins, OMNISPHERE_SQL_DIR=include/sql, and a
    process that never heard of include/ (a Celery worker, the CLI)."""
    airflow = tmp_path / "opt" / "airflow"
    shutil.copytree(REPO / "include", airflow / "include", ignore=shutil.ignore_patterns("__pycache__"))
    spec = write(airflow / "include" / "sql", GOOD)
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugins"), "OMNISPHERE_SQL_DIR": str(airflow / "include" / "sql")}
    script = ("import json, pathlib, sys\n"
              "from omnisphere_release.datamigrate import load_function, load_spec\n"
              "f = load_function(load_spec(pathlib.Path(sys.argv[1])), 'python')\n"
              "print(json.dumps(sys.modules[f.__module__].__file__))\n")
    out = subprocess.run([sys.executable, "-c", script, str(spec)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert Path(json.loads(out.stdout)) == airflow / "include" / "datamigrations" / "users.py"


def test_loading_a_spec_never_imports_its_code(tmp_path):
    """A DAG file lists the specs at parse time: that must not run migration code in the DAG processor."""
    spec = load_spec(write(tmp_path, {**GOOD, "python": "no_such_package.anywhere:copy"}))
    assert (spec.python, spec.statement) == ("no_such_package.anywhere:copy", None)
    assert "no_such_package" not in sys.modules


@pytest.mark.parametrize(("target", "message"), [
    ("{package}.nowhere:copy", r"field python: {package}.nowhere:copy: cannot import {package}.nowhere "
                               r"\(ModuleNotFoundError: .*\); it is looked up in .* and on sys.path"),
    ("{package}.broken:copy", r"field python: .*: cannot import {package}.broken \(ModuleNotFoundError: No module "
                              r"named 'a_library_the_image_does_not_have'\)"),
    ("{package}.batches:copy_users", r"field python: .*: {package}.batches \(.*batches.py\) has no copy_users; its "
                                     r"functions: copy, copy_async, keyword_only, one_argument"),
    ("{package}.batches:NOT_A_FUNCTION", r"field python: .*: NOT_A_FUNCTION is a int, not a function"),
    ("{package}.batches:one_argument", r"field python: .*: one_argument\(conn\) cannot be called as "
                                       r"one_argument\(conn, last_key, upper_key\)"),
    ("{package}.batches:keyword_only", r"keyword_only\(conn, \*, last_key, upper_key\) cannot be called"),
    ("{package}.batches:copy_async", r"field python: .*: copy_async must be a plain function .* not an async"),
])
def test_a_function_that_cannot_be_imported_or_called_is_refused_before_any_connection(include, tmp_path, target,
                                                                                        message):
    path = write(tmp_path, {**GOOD, "python": target.format(package=include)})
    connections = []
    engine = DataMigrationEngine(load_spec(path), lambda: connections.append(1), run_by="test")
    with pytest.raises(DataSpecError, match=message.format(package=include)) as refused:
        engine.run()
    assert str(refused.value).startswith(f"{path}: field python: ")
    assert connections == []  # refused before the database was even opened: nothing changed


def test_a_good_function_with_extra_defaults_is_accepted(include, tmp_path):
    path = write(tmp_path, {**GOOD, "python": f"{include}.batches:copy"})
    assert load_function(load_spec(path), "python").__name__ == "copy"


@pytest.mark.parametrize("direction", ["forward", "revert"])
def test_a_bad_revert_function_refuses_the_forward_run_too(include, tmp_path, direction):
    """Found before the forward run changes data, not during the rollback that needs it."""
    path = write(tmp_path, {**GOOD, "python": f"{include}.batches:copy", "revert": None,
                            "revert_python": f"{include}.batches:one_argument"})
    connections = []
    engine = DataMigrationEngine(load_spec(path), lambda: connections.append(1), run_by="test")
    with pytest.raises(DataSpecError, match=r"field revert_python: .*one_argument\(conn\) cannot be called"):
        engine.run(direction)
    assert connections == []


@pytest.mark.parametrize(("change", "message"), [
    ({"python": "datamigrations.users.copy_users"}, r"field python: .* is not module:function"),
    ({"python": "datamigrations/users.py:copy_users"}, r"field python: .* is not module:function"),
    ({"python": 3}, r"field python: 3 is not module:function"),
    ({"statement": "INSERT INTO new_users SELECT * FROM old_users WHERE id > :last_key AND id <= :upper_key"},
     r"field python: give statement \(SQL\) or python \(a Python function\), not both"),
    ({"python": None}, r"field statement: required \(a non-empty string\), or python: module:function"),
    ({"revert_python": "datamigrations.users:delete_users"}, r"field revert_python: give revert .* not both"),
    ({"revert": None}, r"field revert: required when reversible is true \(or revert_python\)"),
])
def test_bad_python_fields_are_refused_when_the_spec_is_read(tmp_path, change, message):
    path = write(tmp_path, {**GOOD, **change})
    with pytest.raises(DataSpecError, match=message) as refused:
        load_spec(path)
    assert str(path) in str(refused.value)


def test_the_checksum_covers_the_function_s_source_so_promotion_sees_a_code_change(include, tmp_path):
    """Promotion evidence compares spec checksums: a staging release proves nothing about a function changed since."""
    path = write(tmp_path, {**GOOD, "python": f"{include}.batches:copy", "revert": None,
                            "revert_python": f"{include}.batches:one_argument"})
    before = load_spec(path).checksum
    assert load_spec(path).checksum == before  # stable while nothing changes
    module = tmp_path / include / "batches.py"
    module.write_text(MODULE.replace("return 0\n", "return 1\n", 1))
    assert load_spec(path).checksum != before
    assert f"{include}.batches" not in sys.modules  # found and read, never imported
