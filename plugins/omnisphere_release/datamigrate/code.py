"""Find the Python function a spec names (``python: module:function``) and check it, before any batch runs.

Where the code lives: a package under the include folder, the one that holds the SQL tree (``include/`` beside
``include/sql``; ``OMNISPHERE_SQL_DIR``'s parent when that is set), e.g. ``include/datamigrations/users.py`` named as
``datamigrations.users:copy_users``. The engine appends that folder to sys.path, as Airflow does for its DAG folder,
so the module imports the same way in a worker, a task process, the CLI and the tests, with nothing to add to
PYTHONPATH. Not under plugins/: Airflow imports every module of the plugins folder in each of its processes at
start-up, and migration code has no business running in the scheduler. Not beside the spec in data/: that folder
holds the specs (each .yaml there is a migration the release runs), and a service name (``billing-service``) is no
Python package name. A module already importable (a package installed in the image) is found as well.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omnisphere_release.datamigrate.spec import DataMigrationSpec, DataSpecError

BatchFunction = Callable[[Any, int | None, int], Any]  # (conn, last_key, upper_key) -> rows changed


def code_root() -> Path:
    """Return the include folder: the parent of the SQL tree in use (``OMNISPHERE_SQL_DIR`` or include/sql)."""
    from omnisphere_release.catalog import sql_dir

    return sql_dir().parent


def source_file(target: str) -> Path | None:
    """Return the file of the module that ``target`` (module:function) names, found as the import will find it (on
    sys.path, then in the include folder, which :func:`load_function` appends) but without importing anything: a DAG
    file reads the specs at parse time, and migration code must not run in the DAG processor."""
    parts = target.partition(":")[0].split(".")
    for root in [*(Path(p) for p in sys.path if p), code_root()]:
        base = root.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def source_digest(target: str) -> bytes:
    """Return what a spec's checksum adds for its function: the target and its module's source. The module is the
    code that changes data; what it imports (a library in the image) is the image's, and its digest covers that."""
    path = source_file(target)
    return b"\0" + target.encode() + b"\0" + (path.read_bytes() if path else b"(module not found)")


def load_functions(spec: DataMigrationSpec) -> dict[str, BatchFunction]:
    """Import every function ``spec`` names (``python``, ``revert_python``), keyed by field; refuse any bad one.

    Both at once, before the first batch of either direction: a revert function that cannot run is found before the
    forward run changes data, not during the rollback that needs it.
    """
    return {field: load_function(spec, field) for field in ("python", "revert_python") if getattr(spec, field)}


def load_function(spec: DataMigrationSpec, field: str) -> BatchFunction:
    """Import the function that ``spec``'s ``field`` (python or revert_python) names; refuse it naming file and field.

    Checked: the module imports, it has the attribute, the attribute is a plain (not async) callable, and it can be
    called as ``function(conn, last_key, upper_key)``.
    """
    target = getattr(spec, field)
    module_name, _, function_name = target.partition(":")
    where = f"{spec.path}: field {field}: {target}"
    root = str(code_root())
    if root not in sys.path:
        sys.path.append(root)
    if module_name not in sys.modules:
        importlib.invalidate_caches()  # a module written since the last import is seen
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the module raises while importing is the spec's fault
        raise DataSpecError(f"{where}: cannot import {module_name} ({type(exc).__name__}: {exc}); it is looked up "
                            f"in {root} and on sys.path: put it under {root}/ (e.g. {root}/datamigrations/) or "
                            f"fix the name") from None
    function = getattr(module, function_name, None)
    if function is None:
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise DataSpecError(f"{where}: {module_name} ({getattr(module, '__file__', '?')}) has no {function_name}; "
                            f"its functions: {', '.join(found) or 'none'}")
    if not callable(function) or inspect.isclass(function):
        raise DataSpecError(f"{where}: {function_name} is a {type(function).__name__}, not a function")
    if inspect.iscoroutinefunction(function) or inspect.isgeneratorfunction(function):
        raise DataSpecError(f"{where}: {function_name} must be a plain function that returns the rows it changed, "
                            f"not an async or generator function")
    try:
        signature = inspect.signature(function)
        signature.bind(None, 0, 0)
    except (TypeError, ValueError):
        raise DataSpecError(f"{where}: {function_name}{_signature(function)} cannot be called as "
                            f"{function_name}(conn, last_key, upper_key); give it those three parameters") from None
    return function


def _signature(function: Any) -> str:
    try:
        return str(inspect.signature(function))
    except (TypeError, ValueError):
        return "(...)"
