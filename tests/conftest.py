"""Shared fixtures: an Airflow home of the test session's own, and the devstack as a session-scoped fixture."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Airflow reads its configuration when first imported: point it at a home of this session's own before any test
# module imports it, so tests never touch a developer's .airflow/ and run the same on CI.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="omni-airflow-test-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.pop("OMNISPHERE_CATALOG", None)
os.environ.pop("OMNISPHERE_SQL_DIR", None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``make test`` runs on two workers (pytest-xdist), each with a devstack and an Airflow home of its own.

    Tests that share something costly stay on one worker: the live Airflow package (one Airflow for all of it) and
    each e2e module (module state, e.g. the logs the secrets test reads at the end). Every other test is a unit of
    its own. The largest units are handed out first. (xdist's own ``loadgroup`` ignores its marks under pytest 9.)
    """
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("tests/e2e/live/"):
                return "tests/e2e/live/"
            if nodeid.startswith("tests/e2e/"):
                return nodeid.split("::", 1)[0]
            return nodeid

    return SharedFixtureScheduling(config, log)


@pytest.fixture(scope="session")
def devstack() -> Iterator[dict[str, str]]:
    """Start the devstack (PostgreSQL, moto with the ECS simulator, sample services) for the whole session."""
    from devstack import stack

    # Not under pytest's tmp_path: pytest prunes old base folders, which would delete the data of a running server
    # when two test sessions run side by side on one machine.
    state_dir = Path(tempfile.mkdtemp(prefix="omni-devstack-test-"))
    env = stack.start(state_dir)
    saved = {key: os.environ.get(key) for key in env}
    env = {k: v for k, v in env.items() if k not in {"AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER",
                                                      "AIRFLOW__CORE__PLUGINS_FOLDER"}}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            elif key in env:
                os.environ[key] = value
        leftovers = stack.stop(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        assert not leftovers, f"devstack left behind: {leftovers}"


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Create the Airflow metadata database (SQLite) of the test session once."""
    result = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True,
                            env=os.environ.copy(), timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return _AIRFLOW_HOME


@pytest.fixture()
def scratch_database(devstack: dict[str, str]) -> Iterator[str]:
    """Create an empty database for one test and drop it afterwards; yield its DSN."""
    from devstack.postgres import create_scratch_database, drop_scratch_database

    dsn = create_scratch_database(devstack["OMNI_PG_ADMIN_DSN"])
    try:
        yield dsn
    finally:
        drop_scratch_database(devstack["OMNI_PG_ADMIN_DSN"], dsn)


@pytest.fixture()
def sql_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch copy of include/sql that a test may change; OMNISPHERE_SQL_DIR points at it."""
    target = tmp_path / "sql"
    shutil.copytree(REPO / "include" / "sql", target)
    monkeypatch.setenv("OMNISPHERE_SQL_DIR", str(target))
    return target
