"""Shared fixtures: an Airflow home of the test session's own, the devstack as a session-scoped fixture, a check that
none of the devstack's secrets reaches a log, and a watch on PostgreSQL sessions for tests that race them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Generator, Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

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
    _report_secret_watch(session.config)
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``make test`` runs on two workers (pytest-xdist), each with a devstack and an Airflow home of its own.

    Tests that share something costly stay on one worker: the live Airflow package (one Airflow for all of it) and
    each e2e module, in file order. Every other test is a unit of its own. The largest units are handed out first.
    (xdist's own ``loadgroup`` ignores its marks under pytest 9.) The secrets check does not need a module on one
    worker: each worker checks its own session's logs, see ``secret_watch``.
    """
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("tests/e2e/live/"):
                return "tests/e2e/live/"
            if nodeid.startswith("tests/chaos/"):  # one Celery topology for the package
                return "tests/chaos/"
            if nodeid.startswith("tests/e2e/"):
                return nodeid.split("::", 1)[0]
            return nodeid

    return SharedFixtureScheduling(config, log)


# ---- no secret in any log ------------------------------------------------------------------------------------------
class SecretWatch:
    """Find the devstack's secrets in what the session logged, without ever showing them.

    The devstack fixture registers its secrets (the AWS secret key, every PostgreSQL password); from then on every
    report's captured stdout, stderr and log records, the output a test reads through ``capfd``/``capsys``, and the
    log files of each Airflow and of the devstack are searched for them. What is found is recorded as "kind in where"
    and redacted from the report, so that a failing test's output does not print it either.
    """

    MIN_LENGTH = 12  # shorter values could turn up in a log by chance; the devstack's are 24 to 32 characters

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}  # value -> kind: what it is and where it came from, never the value
        self.leaks: list[str] = []
        self.searched = {"texts": 0, "characters": 0, "files": 0}
        self.closed = False  # set once the session's check ran; a leak seen later fails its own report

    def watch_env(self, env: Mapping[str, str]) -> None:
        """Register every secret in an environment: secret keys, and the passwords in DSNs and JSON connections."""
        for name, value in env.items():
            for kind, secret in _secrets_in(name, value):
                if len(secret) < self.MIN_LENGTH:
                    raise ValueError(f"{kind} has fewer than {self.MIN_LENGTH} characters: too short to search the "
                                     f"logs for; make the devstack generate a longer one")
                self.secrets.setdefault(secret, kind)

    def scan(self, text: str, where: str | None) -> str:
        """Record each secret in ``text`` as a leak in ``where``; return ``text`` with the secrets redacted.

        ``where`` None only redacts: the text was searched before (a report repeats its test's earlier sections).
        """
        if where is not None:
            self.searched["texts"] += 1
            self.searched["characters"] += len(text)
        for secret, kind in self.secrets.items():
            if secret in text:
                if where is not None:
                    self.leaks.append(f"{kind} in {where}")
                text = text.replace(secret, f"<{kind}, redacted>")
        return text

    def scan_logs(self, label: str, *paths: Path) -> None:
        """Search log files, and every file under log folders (an Airflow's task, DAG processor and server logs)."""
        if not self.secrets:
            return
        for path in paths:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in (f for f in files if f.exists()):
                self.searched["files"] += 1
                self.scan(file.read_text(errors="replace"), f"{label} {file}")

    def failure(self, leaks: Iterable[str]) -> str:
        return ("A secret of the devstack appeared in a log (the values are not shown):\n"
                + "\n".join(f"  - {leak}" for leak in leaks)
                + "\nFind what logs it (a DSN, a connection, the environment) and log a redacted form instead.")

    def summary(self) -> str:
        return (f"searched {self.searched['characters']:,} characters of test output ({self.searched['texts']} "
                f"captures) and {self.searched['files']} log files for {len(self.secrets)} devstack secrets: "
                + (f"{len(self.leaks)} found" if self.leaks else "none found"))


def _secrets_in(name: str, value: str) -> Iterator[tuple[str, str]]:
    if name.endswith("SECRET_ACCESS_KEY") and value:
        yield f"the AWS secret access key ({name})", value
    if "://" in value:
        url = urlsplit(value)
        if url.password:
            yield f"the {url.scheme} password of {url.username} ({name})", url.password
    elif value.startswith("{"):
        try:
            connection = json.loads(value)
        except ValueError:
            return
        if isinstance(connection, dict) and connection.get("password"):
            yield f"the password of the connection in {name}", str(connection["password"])


SECRET_WATCH = SecretWatch()
_SECRET_SUMMARIES: list[str] = []  # one line per session that had a devstack: this one, or each xdist worker


@pytest.fixture(scope="session", autouse=True)
def secret_watch(request: pytest.FixtureRequest) -> Iterator[SecretWatch]:
    """Fail the session (an error at the teardown of its last test) when a devstack secret appeared in any log.

    Under pytest-xdist each worker is a session of its own, with a devstack of its own: each checks its own logs,
    and sends its summary line to the controller.
    """
    yield SECRET_WATCH
    SECRET_WATCH.scan_logs("Airflow log", _AIRFLOW_HOME / "logs")
    SECRET_WATCH.closed = True
    if SECRET_WATCH.secrets and request.config.getoption("capture") == "no":
        warnings.warn("output capture is off (-s): the secrets check searched the log files only", stacklevel=1)
    if SECRET_WATCH.leaks:
        pytest.fail(SECRET_WATCH.failure(SECRET_WATCH.leaks), pytrace=False)


def _report_secret_watch(config: pytest.Config) -> None:
    """Say what the secrets check searched: in the summary of this session, or of the controller of this worker."""
    if not SECRET_WATCH.secrets:
        return  # no devstack in this session: no secret to look for
    worker = getattr(config, "workerinput", {}).get("workerid")
    summary = f"secrets check{f' ({worker})' if worker else ''}: {SECRET_WATCH.summary()}"
    if worker:
        config.workeroutput["secret_watch"] = summary  # type: ignore[attr-defined]
    else:
        _SECRET_SUMMARIES.append(summary)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """On the xdist controller: keep each worker's secrets check summary for the terminal summary."""
    summary = getattr(node, "workeroutput", {}).get("secret_watch")
    if summary:
        _SECRET_SUMMARIES.append(summary)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for summary in _SECRET_SUMMARIES:
        terminalreporter.write_line(summary)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Scan what each setup, call and teardown captured (stdout, stderr, log records) and redact it in the report."""
    report = yield
    if not SECRET_WATCH.secrets:
        return report
    found_before = len(SECRET_WATCH.leaks)
    # A report carries the sections of the earlier phases of its test too: those were recorded already.
    report.sections = [(title, SECRET_WATCH.scan(content, f"{item.nodeid} ({title})"
                                                 if title.endswith(f" {report.when}") else None))
                       for title, content in report.sections]
    if report.longrepr is not None:
        text = report.longreprtext
        redacted = SECRET_WATCH.scan(text, f"{item.nodeid} (the {report.when} failure's message)")
        if redacted != text:
            report.longrepr = redacted
    new_leaks = SECRET_WATCH.leaks[found_before:]
    if new_leaks and SECRET_WATCH.closed:  # the session's check has run already (the last test's teardown)
        report.outcome = "failed"
        report.longrepr = SECRET_WATCH.failure(new_leaks) + (f"\n\n{report.longrepr}" if report.longrepr else "")
    return report


def _scan_what_is_read(capture: pytest.CaptureFixture, request: pytest.FixtureRequest) -> pytest.CaptureFixture:
    """Scan the output a test reads: ``readouterr()`` takes it out of the report, where the check would look."""
    read = capture.readouterr

    def readouterr():  # type: ignore[no-untyped-def]
        result = read()
        SECRET_WATCH.scan(str(result.out) + str(result.err),
                          f"{request.node.nodeid} (output read through {request.fixturename})")
        return result

    capture.readouterr = readouterr  # type: ignore[method-assign]
    return capture


@pytest.fixture()
def capfd(capfd: pytest.CaptureFixture, request: pytest.FixtureRequest) -> pytest.CaptureFixture:
    """pytest's ``capfd``; what the test reads is also checked for secrets."""
    return _scan_what_is_read(capfd, request)


@pytest.fixture()
def capsys(capsys: pytest.CaptureFixture, request: pytest.FixtureRequest) -> pytest.CaptureFixture:
    """pytest's ``capsys``; what the test reads is also checked for secrets."""
    return _scan_what_is_read(capsys, request)


# ---- the devstack ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def devstack(secret_watch: SecretWatch) -> Iterator[dict[str, str]]:
    """Start the devstack (PostgreSQL, moto with the ECS simulator, sample services) for the whole session."""
    from devstack import stack

    # Not under pytest's tmp_path: pytest prunes old base folders, which would delete the data of a running server
    # when two test sessions run side by side on one machine.
    state_dir = Path(tempfile.mkdtemp(prefix="omni-devstack-test-"))
    env = stack.start(state_dir)
    secret_watch.watch_env(env)
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
        secret_watch.scan_logs("devstack log", *state_dir.glob("*.log"))
        if keep := os.environ.get("OMNI_KEEP_LIVE_LOGS"):  # a folder to copy the devstack's logs to, for a post-mortem
            (Path(keep) / state_dir.name).mkdir(parents=True, exist_ok=True)
            for log in state_dir.glob("*.log"):
                shutil.copy2(log, Path(keep) / state_dir.name / log.name)
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


# ---- watching PostgreSQL sessions ------------------------------------------------------------------------------------
class PgSessions:
    """Wait for what other sessions of one database do, as pg_stat_activity and pg_locks show it.

    Tests that race a migration against other sessions synchronise on these states instead of on time: a session
    waiting for a lock, or gone. Each wait polls until the state holds; its deadline only stops a test that hangs,
    it is no claim about speed.
    """

    DEADLINE_SECONDS = 30.0

    def __init__(self, dsn: str) -> None:
        import psycopg2

        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True  # each query its own transaction: pg_stat_activity is read afresh every time

    def rows(self, query: str, params: Iterable[object] = ()) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(query, list(params))
            return cur.fetchall()

    def wait_for(self, what: str, query: str, params: Iterable[object] = ()) -> tuple:
        """Poll ``query`` until it returns a row; return that row. Fail, naming ``what``, after the deadline."""
        import psycopg2.errors

        params = list(params)
        deadline = time.monotonic() + self.DEADLINE_SECONDS
        last_error = None
        while time.monotonic() < deadline:
            try:
                found = self.rows(query, params)
            except psycopg2.errors.UndefinedTable as exc:  # a table the session under watch has not created yet
                found, last_error = [], exc
            if found:
                return found[0]
            time.sleep(0.01)
        pytest.fail(f"waited {self.DEADLINE_SECONDS:.0f}s for {what}; it did not happen"
                    + (f" (last error: {last_error})" if last_error else ""), pytrace=False)

    _LOCK_WAIT = ("SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted "
                  "WHERE a.datname = current_database() AND a.application_name = %s AND a.wait_event_type = 'Lock' "
                  "AND l.locktype = %s AND (%s::text IS NULL OR l.relation = to_regclass(%s))")

    def wait_until_waiting(self, application_name: str, locktype: str, relation: str | None = None) -> int:
        """Wait until the session named ``application_name`` waits for a lock of ``locktype`` (on ``relation``);
        return its pid."""
        return self.wait_for(f"session {application_name!r} to wait for a {locktype} lock"
                             + (f" on {relation}" if relation else ""),
                             self._LOCK_WAIT, [application_name, locktype, relation, relation])[0]

    def is_waiting(self, application_name: str, locktype: str, relation: str | None = None) -> bool:
        """Tell whether the session named ``application_name`` waits for such a lock now."""
        return bool(self.rows(self._LOCK_WAIT, [application_name, locktype, relation, relation]))

    def wait_until_gone(self, application_name: str) -> None:
        """Wait until no session named ``application_name`` is left (a killed client's backend has ended)."""
        self.wait_for(f"the sessions of {application_name!r} to end",
                      "SELECT 1 WHERE NOT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database() "
                      "AND application_name = %s)", [application_name])

    def close(self) -> None:
        self.conn.close()


@pytest.fixture()
def pg_sessions(scratch_database: str) -> Iterator[PgSessions]:
    """Watch the other sessions of the test's scratch database (see PgSessions)."""
    watch = PgSessions(scratch_database)
    try:
        yield watch
    finally:
        watch.close()
