"""Apply and revert a service's schema migrations safely: one transaction each, bounded locks, one run at a time.

The engine knows nothing of Airflow: the schema_migrations DAG, the release DAGs and the CLI all drive it the same way.

Versions are the numbers of the files, and 0 is one of them (golang-migrate's ``0_initial``): a database where nothing
is applied is at :data:`NOTHING_APPLIED`, shown as ``none``. A database that other tools built is adopted with
:meth:`MigrationEngine.baseline` (or :meth:`MigrationEngine.adopt`, from golang-migrate's own table): the versions it
already has are recorded as applied without running them. Those versions are a floor for ``down``: their down files
never ran against this database, so reverting them is refused unless a person says why it is safe
(``below_baseline``); a release's rollback, which reverts only what it applied, never meets the floor.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2 import sql

from omnisphere_release.locks import LOCK_DDL
from omnisphere_release.logs import Log
from omnisphere_release.migrations.errors import InvalidMigrationInput, LockBusy, LockNotGranted, MigrationFailed
from omnisphere_release.migrations.files import Migration, discover, split_statements
from omnisphere_release.migrations.lint import Finding, lint

HISTORY_TABLE = "omnisphere_schema_history"
LOG_TABLE = "omnisphere_schema_log"
# pg_try_advisory_lock(int4, int4): the first key is the project ('OMNI'), the second the kind of run.
ADVISORY_LOCK_NAMESPACE = 0x4F4D4E49
SCHEMA_MIGRATION_LOCK = 1
#: The version of a database where no migration is applied: below every file version, 0 included. Shown as "none".
NOTHING_APPLIED = -1
#: golang-migrate's table: one row (version bigint, dirty boolean), or none when nothing is applied.
GOLANG_MIGRATE_TABLE = "schema_migrations"
BASELINE_ACTION = "baselined"
#: The log's action for a version reverted below the baseline on purpose (the reason says why that was safe).
BELOW_BASELINE_ACTION = "reverted_below_baseline_accepted"
# The log's actions that mark a version applied: the last of them says whether this engine ran its up file.
_APPLIED_ACTIONS = ("applied", "resolved_applied", BASELINE_ACTION)


def version_label(version: int | None) -> str:
    """Show a version as a person reads it: ``none`` when nothing is applied, never a made-up 0."""
    return "none" if version is None or version == NOTHING_APPLIED else str(version)


_DDL = f"""
CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} (
    version           integer     PRIMARY KEY,
    name              text        NOT NULL,
    checksum_up       text        NOT NULL,
    checksum_down     text,
    state             text        NOT NULL DEFAULT 'applied' CHECK (state IN ('applied', 'dirty')),
    dirty_direction   text        CHECK (dirty_direction IN ('up', 'down')),
    applied_at        timestamptz NOT NULL DEFAULT now(),
    execution_ms      integer,
    applied_by        text        NOT NULL,
    drift_acknowledged text,
    error             text
);
CREATE TABLE IF NOT EXISTS {LOG_TABLE} (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    version      integer     NOT NULL,
    name         text        NOT NULL,
    action       text        NOT NULL,
    by           text        NOT NULL,
    reason       text,
    execution_ms integer
);
""" + LOCK_DDL  # the service's operation lease lives beside the history (omnisphere_release.locks)


@dataclass(frozen=True)
class EngineSettings:
    lock_timeout_ms: int = 3000
    statement_timeout_ms: int = 300_000
    lock_retries: int = 5
    retry_backoff_seconds: float = 1.0
    advisory_lock_wait_seconds: float = 60.0
    # The squawk rules that block a plan (lint.py); None: lint.DEFAULT_BLOCKING_RULES.
    blocking_rules: tuple[str, ...] | None = None

    @classmethod
    def from_catalog(cls, settings: Any, **overrides: Any) -> EngineSettings:
        return cls(lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=settings.statement_timeout_ms,
                   lock_retries=settings.lock_retries,
                   blocking_rules=overrides.pop("blocking_rules", getattr(settings, "blocking_rules", None)),
                   **overrides)


@dataclass(frozen=True)
class AppliedVersion:
    version: int
    name: str
    checksum_up: str
    state: str
    dirty_direction: str | None
    applied_at: Any
    applied_by: str
    error: str | None


@dataclass
class Plan:
    """What a run would do: the ordered steps, their SQL and the lint findings. Building it changes nothing."""

    service: str
    direction: str
    current_version: int
    target_version: int
    steps: list[Migration]
    findings: list[Finding] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)  # numbers the steps skip: allowed, shown so nobody wonders
    # down: the steps' versions that baseline/adopt recorded without running them, reverted anyway for this reason.
    below_baseline: list[int] = field(default_factory=list)
    below_baseline_reason: str | None = None

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "blocking"]

    def step_sql(self, migration: Migration) -> str:
        source = migration.up if self.direction == "up" else migration.down
        return source.sql if source else ""

    def render(self, with_sql: bool = True) -> str:
        if not self.steps:
            return (f"{self.service}: nothing to {self.direction}; schema is at version "
                    f"{version_label(self.current_version)}.")
        verb = "apply" if self.direction == "up" else "revert"
        lines = [f"{self.service}: {verb} {len(self.steps)} migration(s), version {version_label(self.current_version)}"
                 f" -> {version_label(self.target_version)}:"]
        lines += [f"  gap: {gap}" for gap in self.gaps]
        for migration in self.steps:
            source = migration.up if self.direction == "up" else migration.down
            mode = "outside a transaction" if source and source.no_transaction else "in one transaction"
            lines.append(f"  {verb} {migration.label} ({source.path.name if source else '?'}, {mode})")
            if with_sql:
                lines += [f"      {line}" for line in self.step_sql(migration).strip().splitlines()]
        for finding in self.findings:
            lines.append(f"  lint {finding.severity}: {finding.describe()}")
        for item in self.drift:
            lines.append(f"  drift acknowledged: {item}")
        if self.below_baseline:
            lines.append(f"  below the baseline, accepted: {', '.join(map(str, self.below_baseline))} were recorded "
                         f"by baseline/adopt without running them ({self.below_baseline_reason})")
        return "\n".join(lines)


@dataclass(frozen=True)
class StepResult:
    version: int
    name: str
    direction: str
    seconds: float
    lock_retries: int = 0


@dataclass
class RunResult:
    service: str
    direction: str
    from_version: int
    to_version: int
    dry_run: bool
    plan: Plan
    steps: list[StepResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def versions(self) -> list[int]:
        return [s.version for s in self.steps]

    def summary(self) -> str:
        if self.dry_run:
            return (f"{self.service}: dry run, would {('apply' if self.direction == 'up' else 'revert')} "
                    f"{len(self.plan.steps)} migration(s) ({version_label(self.from_version)} -> "
                    f"{version_label(self.plan.target_version)}); nothing changed")
        verb = "Applied" if self.direction == "up" else "Reverted"
        return (f"{self.service}: {verb} {len(self.steps)} migration(s) in {self.seconds:.1f}s "
                f"(version {version_label(self.from_version)} -> {version_label(self.to_version)})")


@dataclass(frozen=True)
class BaselineResult:
    """What baseline or adopt recorded: the versions now marked applied without running, and the baseline."""

    service: str
    version: int
    recorded: list[int]
    source: str  # "baseline --version N", or what adopt read: "golang-migrate schema_migrations version N"
    dry_run: bool = False

    def summary(self) -> str:
        if not self.recorded:
            return (f"{self.service}: already baselined at version {version_label(self.version)} ({self.source}); "
                    f"nothing changed")
        verb = "would record" if self.dry_run else "recorded"
        return (f"{self.service}: {verb} {len(self.recorded)} version(s) as applied without running them "
                f"({', '.join(map(str, self.recorded))}); baseline {self.version} from {self.source}"
                + ("; nothing changed (dry run)" if self.dry_run else ". Lint skips these files from now on."))


@dataclass(frozen=True)
class Status:
    service: str
    current_version: int
    applied: list[AppliedVersion]
    pending: list[Migration]
    dirty: list[AppliedVersion]
    drifted: list[str]
    baseline: int | None = None  # the highest version recorded by baseline or adopt, if any

    def render(self) -> str:
        lines = [f"{self.service}: version {version_label(self.current_version)}, {len(self.applied)} applied, "
                 f"{len(self.pending)} pending"
                 + (f", baseline {self.baseline}" if self.baseline is not None else "")]
        lines += [f"  pending {m.label}" for m in self.pending]
        lines += [f"  DIRTY {d.version}_{d.name} ({d.dirty_direction}): {d.error or 'interrupted'}" for d in self.dirty]
        lines += [f"  DRIFT {d}" for d in self.drifted]
        return "\n".join(lines)


class MigrationEngine:
    """Plan, apply and revert the migrations of one service database."""

    def __init__(
        self,
        service: str,
        migrations_dir: Path,
        connect: Callable[[], Any],
        settings: EngineSettings | None = None,
        applied_by: str = "cli",
        log: Log | None = None,
    ) -> None:
        self.service = service
        self.migrations_dir = migrations_dir
        self._connect_raw = connect
        self.settings = settings or EngineSettings()
        self.applied_by = applied_by
        self.log = log or logging.getLogger("omnisphere_release.migrations")

    # ---- public API --------------------------------------------------------------------------------------------------
    def status(self) -> Status:
        migrations = discover(self.migrations_dir)
        with self._connection() as conn:
            history = self._read_history(conn)
            baseline = self._read_baseline(conn)
        applied = [h for h in history.values() if h.state == "applied"]
        current = max((h.version for h in applied), default=NOTHING_APPLIED)
        return Status(
            service=self.service,
            current_version=current,
            applied=sorted(applied, key=lambda h: h.version),
            pending=[m for m in migrations if m.version not in history],
            dirty=[h for h in history.values() if h.state == "dirty"],
            drifted=self._drift(migrations, history),
            baseline=baseline,
        )

    def last_actions(self, versions: list[int]) -> dict[int, str]:
        """Return, for each version, the last thing the audit log says was done to it: "reverted by X (reason)"."""
        if not versions:
            return {}
        with self._connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", [LOG_TABLE])
            if not cur.fetchone()[0]:
                return {}
            cur.execute(sql.SQL("SELECT DISTINCT ON (version) version, action, by, reason, at FROM {} "
                                "WHERE version = ANY(%s) ORDER BY version, at DESC, id DESC")
                        .format(sql.Identifier(LOG_TABLE)), [versions])
            return {version: f"{action} by {by} at {at:%Y-%m-%d %H:%M:%S %Z}" + (f" ({reason})" if reason else "")
                    for version, action, by, reason, at in cur.fetchall()}

    def plan(self, direction: str, target: int | None = None, run_lint: bool = True,
             below_baseline: str | None = None) -> Plan:
        """Return what ``migrate`` would do; raise InvalidMigrationInput when it would be refused."""
        migrations = discover(self.migrations_dir)
        with self._connection() as conn:
            return self._plan(conn, migrations, self._read_history(conn), direction, target, run_lint,
                              drift_reason=None, below_baseline=below_baseline)

    def migrate(
        self,
        direction: str,
        target: int | None = None,
        dry_run: bool = False,
        reason: str | None = None,
        acknowledge_drift: str | None = None,
        run_lint: bool = True,
        below_baseline: str | None = None,
    ) -> RunResult:
        """Apply (``up``) or revert (``down``) migrations to ``target``; with ``dry_run``, only plan.

        ``below_baseline`` (a reason) lets ``down`` revert versions that baseline/adopt recorded without running
        them, which is refused otherwise; the reason is kept in the migration log for each of them.
        """
        started = time.monotonic()
        migrations = discover(self.migrations_dir)  # every file is validated before the database is touched
        with self._connection() as conn:
            if dry_run:
                plan = self._plan(conn, migrations, self._read_history(conn), direction, target, run_lint,
                                  acknowledge_drift, below_baseline)
                self.log.info("%s", plan.render())
                self._refuse_blocking_findings(plan)
                return RunResult(self.service, direction, plan.current_version, plan.current_version, True, plan)
            self._acquire_lock(conn)
            try:
                self._ensure_history(conn)
                history = self._read_history(conn)
                plan = self._plan(conn, migrations, history, direction, target, run_lint, acknowledge_drift,
                                  below_baseline)
                self._refuse_blocking_findings(plan)
                for finding in plan.findings:
                    if finding.severity == "ignored":
                        self.log.warning("Lint finding accepted by the file: %s", finding.describe())
                    elif finding.severity == "advice":
                        self.log.info("Lint advice: %s", finding.describe())
                if plan.drift:
                    self._acknowledge_drift(conn, migrations, history, acknowledge_drift or "")
                if plan.below_baseline:
                    self._accept_below_baseline(conn, plan)
                result = RunResult(self.service, direction, plan.current_version, plan.current_version, False, plan)
                if not plan.steps:
                    self.log.info("%s: nothing to %s; schema is at version %s", self.service, direction,
                                  version_label(plan.current_version))
                for index, migration in enumerate(plan.steps, start=1):
                    self.log.info("%s: %s %s (%d of %d)", self.service,
                                  "applying" if direction == "up" else "reverting", migration.label, index,
                                  len(plan.steps))
                    step = (self._apply if direction == "up" else self._revert)(conn, migration, reason)
                    result.steps.append(step)
                    result.to_version = migration.version if direction == "up" else self._version_below(
                        migration.version, history)
                    self.log.info("%s: %s %s in %.2fs%s", self.service,
                                  "applied" if direction == "up" else "reverted", migration.label, step.seconds,
                                  f" after {step.lock_retries} lock retries" if step.lock_retries else "")
            finally:
                self._release_lock(conn)
        result.seconds = time.monotonic() - started
        self.log.info("%s", result.summary())
        return result

    def _refuse_blocking_findings(self, plan: Plan) -> None:
        if plan.blocking:
            raise InvalidMigrationInput(
                f"{self.service}: lint found {len(plan.blocking)} finding(s) that would block the application "
                f"for long:\n" + "\n".join(f"  {f.describe()}" for f in plan.blocking)
                + "\nRewrite the migration (CONCURRENTLY, NOT VALID then VALIDATE, ...) or accept a finding "
                "with '-- omni:lint-ignore <rule> <reason>' in the file.")

    def resolve(self, version: int, outcome: str, reason: str) -> None:
        """Settle a dirty version after a person checked the database: ``outcome`` is ``applied`` or ``reverted``."""
        if outcome not in {"applied", "reverted"}:
            raise InvalidMigrationInput(f"outcome must be 'applied' or 'reverted', not {outcome!r}")
        if not reason.strip():
            raise InvalidMigrationInput("resolve needs a reason: say what you checked in the database")
        with self._connection() as conn:
            self._acquire_lock(conn)
            try:
                history = self._read_history(conn)
                row = history.get(version)
                if row is None or row.state != "dirty":
                    raise InvalidMigrationInput(f"{self.service}: version {version} is not dirty; nothing to resolve")
                with conn, conn.cursor() as cur:
                    if outcome == "applied":
                        cur.execute(sql.SQL("UPDATE {} SET state = 'applied', dirty_direction = NULL, error = NULL "
                                            "WHERE version = %s").format(sql.Identifier(HISTORY_TABLE)), [version])
                    else:
                        cur.execute(sql.SQL("DELETE FROM {} WHERE version = %s").format(
                            sql.Identifier(HISTORY_TABLE)), [version])
                    self._log_row(cur, version, row.name, f"resolved_{outcome}", reason, None)
                self.log.info("%s: version %d resolved as %s (%s)", self.service, version, outcome, reason)
            finally:
                self._release_lock(conn)

    def baseline(self, version: int, reason: str, *, dry_run: bool = False, source: str | None = None) -> BaselineResult:
        """Record every migration up to ``version`` as applied without running it: the database has them already.

        The current files' checksums are recorded (a later edit is drift, as for any applied file) and the reason
        goes to the migration log. Refused, changing nothing, when the history already says something else: a dirty
        version, a version above ``version``, a different checksum, or some of the versions but not all. Run again
        on a database baselined the same way, it changes nothing.
        """
        if not (reason or "").strip():
            raise InvalidMigrationInput(f"{self.service}: baseline needs a reason: say how you know the database is "
                                        f"at version {version} (it is kept in the migration log)")
        migrations = discover(self.migrations_dir)
        by_version = {m.version: m for m in migrations}
        if version not in by_version:
            raise InvalidMigrationInput(
                f"{self.service}: no migration file numbered {version} in {self.migrations_dir} (known versions: "
                f"{', '.join(str(v) for v in sorted(by_version)) or 'none'}); the baseline is the version of the "
                f"newest file the database already has")
        source = source or f"baseline --version {version}"
        wanted = [m for m in migrations if m.version <= version]
        with self._connection() as conn:
            if dry_run:
                recorded = self._baseline_steps(self._read_history(conn), wanted, version, source)
                result = BaselineResult(self.service, version, [m.version for m in recorded], source, dry_run=True)
                self.log.info("%s", result.summary())
                return result
            self._acquire_lock(conn)
            try:
                self._ensure_history(conn)
                recorded = self._baseline_steps(self._read_history(conn), wanted, version, source)
                with conn, conn.cursor() as cur:  # all of it or nothing
                    for migration in recorded:
                        cur.execute(sql.SQL(
                            "INSERT INTO {} (version, name, checksum_up, checksum_down, applied_by) "
                            "VALUES (%s, %s, %s, %s, %s)").format(sql.Identifier(HISTORY_TABLE)),
                            [migration.version, migration.name, migration.up.checksum,
                             migration.down.checksum if migration.down else None, self.applied_by])
                        self._log_row(cur, migration.version, migration.name, BASELINE_ACTION,
                                      f"{source}: {reason.strip()}", None)
            finally:
                self._release_lock(conn)
        result = BaselineResult(self.service, version, [m.version for m in recorded], source)
        self.log.info("%s", result.summary())
        return result

    def adopt(self, reason: str, *, table: str = GOLANG_MIGRATE_TABLE, dry_run: bool = False) -> BaselineResult:
        """Baseline at the version golang-migrate's table records, refusing a dirty one; leave that table as it is."""
        if not (reason or "").strip():
            raise InvalidMigrationInput(f"{self.service}: adopt needs a reason (it is kept in the migration log)")
        with self._connection() as conn:
            version = self._golang_migrate_version(conn, table)
            history = self._read_history(conn)
        if version is None:
            if history:
                raise InvalidMigrationInput(
                    f"{self.service}: golang-migrate's {table} says nothing is applied, but this engine's history "
                    f"records version(s) {', '.join(str(v) for v in sorted(history))}; they disagree, nothing was "
                    f"changed. Find out which is right before going on (`status`).")
            result = BaselineResult(self.service, NOTHING_APPLIED, [], f"golang-migrate's {table} (empty)", dry_run)
            self.log.info("%s: golang-migrate's %s is empty: nothing is applied, nothing to adopt; `up` applies "
                          "every file.", self.service, table)
            return result
        return self.baseline(version, reason, dry_run=dry_run,
                             source=f"golang-migrate's {table} (version {version}, clean)")

    def _baseline_steps(self, history: dict[int, AppliedVersion], wanted: list[Migration], version: int,
                        source: str) -> list[Migration]:
        """Return the migrations a baseline must record; refuse when the history disagrees with it."""
        self._refuse_dirty(history, wanted)
        refused = f"{self.service}: {source} refused, nothing was changed:"
        above = sorted(v for v in history if v > version)
        if above:
            row = history[above[-1]]
            raise InvalidMigrationInput(
                f"{refused} the history already records version {row.version} ({row.name}) applied by "
                f"{row.applied_by} at {row.applied_at}, above {version}. The database is past {version} by this "
                f"engine's account: check which is right (`status`) before going on.")
        wanted_versions = {m.version for m in wanted}
        unknown = sorted(set(history) - wanted_versions)
        if unknown:
            raise InvalidMigrationInput(
                f"{refused} the history records version(s) {', '.join(map(str, unknown))}, which have no file in "
                f"{self.migrations_dir}.")
        differ = [m for m in wanted if m.version in history and history[m.version].checksum_up != m.up.checksum]
        if differ:
            raise InvalidMigrationInput(
                f"{refused} {differ[0].up.path} differs from the file recorded when version {differ[0].version} "
                f"was applied; restore it, or acknowledge the drift with `up --acknowledge-drift`.")
        missing = [m for m in wanted if m.version not in history]
        if history and missing:
            current = max(history)
            raise InvalidMigrationInput(
                f"{refused} the history records version(s) up to {current} applied by this engine; a baseline at "
                f"{version} would mark {', '.join(m.label for m in missing)} applied without running them. If the "
                f"database has them, the history is wrong: find out how before going on. If it does not, "
                f"`up --to {version}` applies them.")
        return missing

    def _golang_migrate_version(self, conn: Any, table: str) -> int | None:
        """Return the version golang-migrate's table records (None: nothing applied); refuse a dirty one."""
        if not re.fullmatch(r"[A-Za-z_][\w$]*(\.[A-Za-z_][\w$]*)?", table):
            raise InvalidMigrationInput(f"--table {table!r}: give a table name, optionally schema-qualified "
                                        f"(golang-migrate's x-migrations-table), e.g. schema_migrations")
        with conn, conn.cursor() as cur:
            cur.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                        "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped", [table])
            columns = dict(cur.fetchall())
            if not columns:
                raise InvalidMigrationInput(
                    f"{self.service}: the database has no table {table}, so golang-migrate did not migrate it "
                    f"(or its table has another name: --table). If you know the version the database is at, "
                    f"`baseline --version N --reason ...` records it. Nothing was changed.")
            if columns.get("version") not in {"bigint", "integer"} or columns.get("dirty") != "boolean":
                raise InvalidMigrationInput(
                    f"{self.service}: {table} is not golang-migrate's table: it has columns "
                    f"{', '.join(f'{k} {v}' for k, v in columns.items())}, not (version bigint, dirty boolean). "
                    f"Use `baseline --version N` with the version you know. Nothing was changed.")
            cur.execute(sql.SQL("SELECT version, dirty FROM {}").format(sql.Identifier(*table.split("."))))
            rows = cur.fetchall()
        if len(rows) > 1:
            raise InvalidMigrationInput(
                f"{self.service}: golang-migrate's {table} holds {len(rows)} rows "
                f"({', '.join(f'{v} dirty={d}' for v, d in rows)}); golang-migrate keeps exactly one. Find out "
                f"which is true, then `baseline --version N`. Nothing was changed.")
        if not rows or (rows[0][0] < 0 and not rows[0][1]):
            return None
        version, dirty = rows[0]
        if dirty:
            raise InvalidMigrationInput(
                f"{self.service}: golang-migrate's {table} says version {version} is dirty: that migration failed "
                f"part-way, and the database may hold part of it. Check what of version {version} ran and finish "
                f"or undo it by hand, then mark it clean with golang-migrate (`migrate ... force {version}`, or the "
                f"version below if you undid it) and adopt again. Nothing was changed.")
        return int(version)

    def _read_baseline(self, conn: Any) -> int | None:
        """Return the highest version ever recorded by baseline or adopt (its files are not linted again)."""
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", [LOG_TABLE])
            if not cur.fetchone()[0]:
                return None
            cur.execute(sql.SQL("SELECT max(version) FROM {} WHERE action = %s").format(sql.Identifier(LOG_TABLE)),
                        [BASELINE_ACTION])
            return cur.fetchone()[0]

    # ---- planning ----------------------------------------------------------------------------------------------------
    def _plan(self, conn: Any, migrations: list[Migration], history: dict[int, AppliedVersion], direction: str,
              target: int | None, run_lint: bool, drift_reason: str | None,
              below_baseline: str | None = None) -> Plan:
        if direction not in {"up", "down"}:
            raise InvalidMigrationInput(f"direction must be 'up' or 'down', not {direction!r}")
        self._refuse_dirty(history, migrations)
        drift = self._drift(migrations, history)
        if drift and not (drift_reason and drift_reason.strip()):
            raise InvalidMigrationInput(
                f"{self.service}: applied migration files were changed since they ran:\n"
                + "\n".join(f"  {item}" for item in drift)
                + "\nRestore the files, or acknowledge the change with a reason (--acknowledge-drift 'why').")
        by_version = {m.version: m for m in migrations}
        applied = sorted(v for v, h in history.items() if h.state == "applied")
        current = applied[-1] if applied else NOTHING_APPLIED
        pending = [m for m in migrations if m.version not in history]
        early = [m for m in pending if m.version < current]
        if early:
            raise InvalidMigrationInput(
                f"{self.service}: {early[0].up.path} (version {early[0].version}) is older than the applied "
                f"version {current}; out-of-order migrations are refused: renumber it above {current}")
        known = ", ".join(str(v) for v in sorted(by_version)) or "none"
        below: list[int] = []  # down: versions below the baseline, reverted for a reason
        if direction == "up":
            if target is None:
                target = pending[-1].version if pending else current
            if target < current:
                raise InvalidMigrationInput(
                    f"{self.service}: target version {target} is below the current version {current}; "
                    f"use direction 'down' to revert")
            if target != current and target not in by_version:
                raise InvalidMigrationInput(
                    f"{self.service}: target version {target} has no migration file in {self.migrations_dir}; "
                    f"known versions: {known}")
            steps = [m for m in pending if m.version <= target]
        else:
            if target is None:
                target = applied[-2] if len(applied) >= 2 else NOTHING_APPLIED  # one step down by default
            if target > current and target in by_version:
                raise InvalidMigrationInput(
                    f"{self.service}: target version {target} is above the current version "
                    f"{version_label(current)}; use direction 'up' to apply")
            # The target stays applied. A number without a file (0 in a set that starts at 1) keeps nothing, so it
            # reverts everything above it, as `down --to 0` always did; a pending file's number is ambiguous.
            if target != NOTHING_APPLIED and target not in history and target in by_version:
                raise InvalidMigrationInput(
                    f"{self.service}: target version {target} is not an applied version, so it cannot be kept; "
                    f"applied: {', '.join(str(v) for v in applied) or 'none'}. `down --to V` keeps V applied; "
                    f"`down --all` reverts everything")
            missing = [v for v in applied if v > target and v not in by_version]
            if missing:
                raise InvalidMigrationInput(
                    f"{self.service}: applied version {missing[0]} has no file in {self.migrations_dir}; "
                    f"its down file is needed to revert it")
            steps = [by_version[v] for v in reversed(applied) if v > target]
            below = self._refuse_below_baseline(conn, steps, target, below_baseline)
            irreversible = [m for m in steps if not m.reversible]
            if irreversible:
                m = irreversible[0]
                raise InvalidMigrationInput(
                    f"{self.service}: {m.label} is irreversible ({m.irreversible_reason}); it cannot be reverted "
                    f"by SQL: restore the backup taken before it was applied")
        findings: list[Finding] = []
        if run_lint and direction == "up" and steps:
            # Files at or below the baseline ran before this engine knew the database: they are never linted again.
            baseline = self._read_baseline(conn)
            to_lint = [m for m in steps if baseline is None or m.version > baseline]
            if to_lint:
                findings = lint(to_lint, blocking_rules=self.settings.blocking_rules,
                                relation_rows=lambda name: self._relation_rows(conn, name))
        plan = Plan(self.service, direction, current, target, steps, findings, drift if drift_reason else [],
                    _gaps(current, steps) if direction == "up" else [])
        if direction == "down" and below:
            plan.below_baseline, plan.below_baseline_reason = below, (below_baseline or "").strip()
        return plan

    def _refuse_below_baseline(self, conn: Any, steps: list[Migration], target: int,
                               reason: str | None) -> list[int]:
        """Refuse a down whose steps include versions baseline/adopt recorded without running them, unless a
        ``reason`` says why reverting them is safe; return those versions (empty: none, the usual case).

        Their down files never ran against this database: another tool built what they would drop, maybe otherwise
        than the up files say. A version this engine applied again after such a revert is its own again.
        """
        baselined = self._baselined(conn, [m.version for m in steps])
        if not baselined:
            return []
        below = [m.version for m in steps if m.version in baselined]
        if (reason or "").strip():
            return below
        floor = max(below)
        by, why, at = baselined[floor]
        labels = ", ".join(m.label for m in steps if m.version in baselined)
        asked = "down --all" if target == NOTHING_APPLIED else f"down --to {target}"
        lowest = (f"The lowest it can go is version {floor} (`down --to {floor}`), reverting only what this engine "
                  f"applied above the baseline" if steps[0].version > floor else
                  "Nothing above the baseline was applied by this engine, so there is nothing `down` may revert")
        raise InvalidMigrationInput(
            f"{self.service}: {asked} refused, nothing was changed: it would revert {labels}, at or below the "
            f"baseline {floor} ({why}; recorded by {by} at {at:%Y-%m-%d %H:%M:%S %Z}). Those versions were recorded "
            f"as applied without running them: their down files never ran against this database, which another tool "
            f"built. {lowest}. To go below it, restore the backup taken before the change you want undone; or, if "
            f"you have checked that these down files undo exactly what the other tool applied, say so on record: "
            f"`omni-migrate {self.service} {asked} --below-baseline 'how you checked' --reason '...'`.")

    def _baselined(self, conn: Any, versions: list[int]) -> dict[int, tuple[str, str, Any]]:
        """Return, of ``versions``, those whose up file this engine never ran: the last log entry that marked them
        applied is baseline/adopt's. Each with who recorded it, the recorded reason (its source first), and when."""
        if not versions:
            return {}
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", [LOG_TABLE])
            if not cur.fetchone()[0]:
                return {}
            cur.execute(sql.SQL("SELECT DISTINCT ON (version) version, action, by, reason, at FROM {} "
                                "WHERE version = ANY(%s) AND action = ANY(%s) ORDER BY version, id DESC")
                        .format(sql.Identifier(LOG_TABLE)), [versions, list(_APPLIED_ACTIONS)])
            return {version: (by, reason or "no reason recorded", at)
                    for version, action, by, reason, at in cur.fetchall() if action == BASELINE_ACTION}

    def _accept_below_baseline(self, conn: Any, plan: Plan) -> None:
        """Record, before any of them is reverted, that versions below the baseline are reverted on purpose."""
        names = {m.version: m.name for m in plan.steps}
        with conn, conn.cursor() as cur:
            for version in plan.below_baseline:
                self._log_row(cur, version, names[version], BELOW_BASELINE_ACTION, plan.below_baseline_reason, None)
        self.log.warning("%s: reverting version(s) %s below the baseline, recorded by baseline/adopt without running "
                         "them, as asked: %s. Their down files never ran here before; check the schema afterwards.",
                         self.service, ", ".join(map(str, plan.below_baseline)), plan.below_baseline_reason)

    def _refuse_dirty(self, history: dict[int, AppliedVersion], migrations: list[Migration]) -> None:
        dirty = [h for h in history.values() if h.state == "dirty"]
        if dirty:
            d = dirty[0]
            label = next((m.label for m in migrations if m.version == d.version), f"{d.version}_{d.name}")
            raise InvalidMigrationInput(
                f"{self.service}: version {label} was interrupted while running outside a "
                f"transaction ({d.dirty_direction}, by {d.applied_by} at {d.applied_at}): {d.error or 'no error recorded'}. "
                f"Check the database, then run `python -m omnisphere_release.migrations {self.service} resolve "
                f"--version {d.version} --as applied|reverted --reason '...'`.")

    def _relation_rows(self, conn: Any, name: str) -> bool | None:
        """Say whether relation ``name`` (a table, or an index: its table) holds rows; None when it does not exist.

        Asked by the lint before the plan runs. A table locked by someone else for more than a second, or one this
        role cannot read, is taken to hold rows: when in doubt, the finding blocks.
        """
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SET LOCAL lock_timeout = '1s'")
                cur.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                            "WHERE c.oid = coalesce((SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = "
                            "to_regclass(%s)), to_regclass(%s))", [name, name])
                row = cur.fetchone()
                if row is None:
                    return None
                cur.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(*row)))
                return bool(cur.fetchone()[0])
        except psycopg2.Error as exc:
            self.log.info("%s: could not tell whether %s holds rows (%s); its lint findings block",
                          self.service, name, _pg_message(exc))
            return True

    def _drift(self, migrations: list[Migration], history: dict[int, AppliedVersion]) -> list[str]:
        by_version = {m.version: m for m in migrations}
        drift = []
        for version, row in sorted(history.items()):
            migration = by_version.get(version)
            if migration is not None and migration.up.checksum != row.checksum_up:
                drift.append(f"{migration.up.path}: checksum {migration.up.checksum[:12]} differs from the applied "
                             f"{row.checksum_up[:12]} (applied {row.applied_at} by {row.applied_by})")
        return drift

    @staticmethod
    def _version_below(version: int, history: dict[int, AppliedVersion]) -> int:
        return max((v for v, h in history.items() if v < version and h.state == "applied"), default=NOTHING_APPLIED)

    # ---- execution ---------------------------------------------------------------------------------------------------
    def _apply(self, conn: Any, migration: Migration, reason: str | None) -> StepResult:
        if migration.up.no_transaction:
            return self._run_outside_transaction(conn, migration, "up", reason)
        started = time.monotonic()

        def work(cur: Any) -> None:
            cur.execute(migration.up.sql)
            elapsed_ms = int((time.monotonic() - started) * 1000)
            cur.execute(sql.SQL(
                "INSERT INTO {} (version, name, checksum_up, checksum_down, applied_by, execution_ms) "
                "VALUES (%s, %s, %s, %s, %s, %s)").format(sql.Identifier(HISTORY_TABLE)),
                [migration.version, migration.name, migration.up.checksum,
                 migration.down.checksum if migration.down else None, self.applied_by, elapsed_ms])
            self._log_row(cur, migration.version, migration.name, "applied", reason, elapsed_ms)

        retries = self._in_transaction(conn, migration, work)
        return StepResult(migration.version, migration.name, "up", time.monotonic() - started, retries)

    def _revert(self, conn: Any, migration: Migration, reason: str | None) -> StepResult:
        down = migration.down
        assert down is not None  # _plan refuses irreversible steps
        if down.no_transaction:
            return self._run_outside_transaction(conn, migration, "down", reason)
        started = time.monotonic()

        def work(cur: Any) -> None:
            cur.execute(down.sql)
            cur.execute(sql.SQL("DELETE FROM {} WHERE version = %s").format(sql.Identifier(HISTORY_TABLE)),
                        [migration.version])
            self._log_row(cur, migration.version, migration.name, "reverted", reason,
                          int((time.monotonic() - started) * 1000))

        retries = self._in_transaction(conn, migration, work)
        return StepResult(migration.version, migration.name, "down", time.monotonic() - started, retries)

    def _in_transaction(self, conn: Any, migration: Migration, work: Callable[[Any], None]) -> int:
        """Run ``work`` in one transaction with the timeouts; retry with backoff when a lock is not granted."""
        attempt = 0
        while True:
            try:
                with conn, conn.cursor() as cur:  # commits on success, rolls back on any error
                    self._set_timeouts(cur, local=True)
                    work(cur)
                return attempt
            except psycopg2.errors.LockNotAvailable as exc:
                attempt = self._backoff_or_raise(migration, attempt, exc)
            except psycopg2.errors.QueryCanceled as exc:
                raise MigrationFailed(
                    f"{self.service}: {migration.label} exceeded statement_timeout "
                    f"({self.settings.statement_timeout_ms} ms) and was rolled back: {_pg_message(exc)}. "
                    f"Move the data work to a data migration, or raise migrations.statement_timeout_ms in the catalog."
                ) from None
            except psycopg2.Error as exc:
                raise MigrationFailed(
                    f"{self.service}: {migration.label} failed and was rolled back (nothing of it remains): "
                    f"{_pg_message(exc)}") from None

    def _run_outside_transaction(self, conn: Any, migration: Migration, direction: str, reason: str | None) -> StepResult:
        source = migration.up if direction == "up" else migration.down
        assert source is not None
        started = time.monotonic()
        table = sql.Identifier(HISTORY_TABLE)
        with conn, conn.cursor() as cur:  # the dirty mark is committed before any statement runs
            if direction == "up":
                cur.execute(sql.SQL(
                    "INSERT INTO {} (version, name, checksum_up, checksum_down, applied_by, state, dirty_direction) "
                    "VALUES (%s, %s, %s, %s, %s, 'dirty', 'up')").format(table),
                    [migration.version, migration.name, migration.up.checksum,
                     migration.down.checksum if migration.down else None, self.applied_by])
            else:
                cur.execute(sql.SQL("UPDATE {} SET state = 'dirty', dirty_direction = 'down', applied_by = %s "
                                    "WHERE version = %s").format(table), [self.applied_by, migration.version])
        retries = 0
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                self._set_timeouts(cur, local=False)
                for statement in split_statements(source.sql):
                    attempt = 0
                    while True:
                        try:
                            cur.execute(statement)
                            break
                        except psycopg2.errors.LockNotAvailable as exc:
                            attempt = self._backoff_or_raise(migration, attempt, exc)
                            retries += 1
        except (psycopg2.Error, MigrationFailed) as exc:
            message = _pg_message(exc) if isinstance(exc, psycopg2.Error) else str(exc)
            with conn.cursor() as cur:  # still in autocommit: the error is saved beside the dirty mark at once
                cur.execute(sql.SQL("UPDATE {} SET error = %s WHERE version = %s").format(table),
                            [message[:2000], migration.version])
            # Not retryable even when a lock was the cause: the version is dirty until a person resolves it.
            raise MigrationFailed(
                f"{self.service}: {migration.label} ({direction}, outside a transaction) failed: {message}. "
                f"The version is marked dirty: some statements may have run (an interrupted CREATE INDEX "
                f"CONCURRENTLY leaves an INVALID index). Check the database, then run `python -m "
                f"omnisphere_release.migrations {self.service} resolve --version {migration.version} "
                f"--as applied|reverted --reason '...'`.") from None
        finally:
            with conn.cursor() as cur:
                cur.execute("RESET lock_timeout; RESET statement_timeout")
            conn.autocommit = False  # back to one transaction per statement group for the bookkeeping below
        elapsed_ms = int((time.monotonic() - started) * 1000)
        with conn, conn.cursor() as cur:
            if direction == "up":
                cur.execute(sql.SQL("UPDATE {} SET state = 'applied', dirty_direction = NULL, execution_ms = %s, "
                                    "applied_at = now() WHERE version = %s").format(table),
                            [elapsed_ms, migration.version])
            else:
                cur.execute(sql.SQL("DELETE FROM {} WHERE version = %s").format(table), [migration.version])
            self._log_row(cur, migration.version, migration.name, "applied" if direction == "up" else "reverted",
                          reason, elapsed_ms)
        return StepResult(migration.version, migration.name, direction, time.monotonic() - started, retries)

    def _backoff_or_raise(self, migration: Migration, attempt: int, exc: Exception) -> int:
        if attempt >= self.settings.lock_retries:
            raise LockNotGranted(
                f"{self.service}: {migration.label} could not get its lock within lock_timeout "
                f"({self.settings.lock_timeout_ms} ms) after {attempt + 1} attempts, so it gave up rather than queue "
                f"the application's queries behind it: {_pg_message(exc)}. Find the long transaction holding the "
                f"table (pg_stat_activity) or retry in a quieter moment.") from None
        delay = min(30.0, self.settings.retry_backoff_seconds * (2 ** attempt)) * random.uniform(0.8, 1.2)
        self.log.warning("%s: %s waited %d ms for a lock without getting it; retry %d of %d in %.1fs",
                         self.service, migration.label, self.settings.lock_timeout_ms, attempt + 1,
                         self.settings.lock_retries, delay)
        time.sleep(delay)
        return attempt + 1

    def _set_timeouts(self, cur: Any, local: bool) -> None:
        scope = sql.SQL("SET LOCAL" if local else "SET")
        cur.execute(sql.SQL("{} lock_timeout = {}").format(scope, sql.Literal(f"{self.settings.lock_timeout_ms}ms")))
        cur.execute(sql.SQL("{} statement_timeout = {}").format(
            scope, sql.Literal(f"{self.settings.statement_timeout_ms}ms")))

    def _log_row(self, cur: Any, version: int, name: str, action: str, reason: str | None,
                 execution_ms: int | None) -> None:
        cur.execute(sql.SQL("INSERT INTO {} (version, name, action, by, reason, execution_ms) "
                            "VALUES (%s, %s, %s, %s, %s, %s)").format(sql.Identifier(LOG_TABLE)),
                    [version, name, action, self.applied_by, reason, execution_ms])

    def _acknowledge_drift(self, conn: Any, migrations: list[Migration], history: dict[int, AppliedVersion],
                           reason: str) -> None:
        by_version = {m.version: m for m in migrations}
        with conn, conn.cursor() as cur:
            for version, row in history.items():
                migration = by_version.get(version)
                if migration is None or migration.up.checksum == row.checksum_up:
                    continue
                cur.execute(sql.SQL("UPDATE {} SET checksum_up = %s, checksum_down = %s, drift_acknowledged = %s "
                                    "WHERE version = %s").format(sql.Identifier(HISTORY_TABLE)),
                            [migration.up.checksum, migration.down.checksum if migration.down else None, reason,
                             version])
                self._log_row(cur, version, row.name, "drift_acknowledged", reason, None)
                self.log.warning("%s: drift of %s acknowledged: %s", self.service, migration.label, reason)

    # ---- connection, history and lock --------------------------------------------------------------------------------
    def _connection(self) -> Any:
        conn = self._connect_raw()
        conn.autocommit = False
        with conn, conn.cursor() as cur:
            # pg_stat_activity then shows who runs migrations on this database.
            cur.execute("SELECT set_config('application_name', %s, false)", [f"omni-migrate {self.applied_by}"[:63]])
            # If this process dies mid-migration, the server notices within a second, rolls the migration back and
            # frees the migration lock, instead of running on until the statement ends.
            cur.execute("SELECT set_config('client_connection_check_interval', '1s', false)")
        return _Closing(conn)

    def _ensure_history(self, conn: Any) -> None:
        with conn, conn.cursor() as cur:
            cur.execute(_DDL)

    def _read_history(self, conn: Any) -> dict[int, AppliedVersion]:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", [HISTORY_TABLE])
            if not cur.fetchone()[0]:
                return {}
            cur.execute(sql.SQL("SELECT version, name, checksum_up, state, dirty_direction, applied_at, applied_by, "
                                "error FROM {} ORDER BY version").format(sql.Identifier(HISTORY_TABLE)))
            return {row[0]: AppliedVersion(*row) for row in cur.fetchall()}

    def _acquire_lock(self, conn: Any) -> None:
        deadline = time.monotonic() + self.settings.advisory_lock_wait_seconds
        waited_logged = False
        while True:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s, %s)", [ADVISORY_LOCK_NAMESPACE, SCHEMA_MIGRATION_LOCK])
                if cur.fetchone()[0]:
                    return
                holder = self._lock_holder(cur)
            if time.monotonic() >= deadline:
                raise LockBusy(
                    f"{self.service}: another migration run holds the lock: {holder}. Waited "
                    f"{self.settings.advisory_lock_wait_seconds:.0f}s. Let it finish, or if it is stuck, end it "
                    f"(pg_terminate_backend) and rerun.")
            if not waited_logged:
                self.log.info("%s: waiting up to %.0fs for the migration lock held by %s", self.service,
                              self.settings.advisory_lock_wait_seconds, holder)
                waited_logged = True
            time.sleep(0.5)

    @staticmethod
    def _lock_holder(cur: Any) -> str:
        cur.execute(
            "SELECT a.pid, a.application_name, a.usename, a.backend_start FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid = %s AND l.objid = %s AND l.objsubid = 2",
            [ADVISORY_LOCK_NAMESPACE, SCHEMA_MIGRATION_LOCK])
        row = cur.fetchone()
        if row is None:
            return "a session that has just released it"
        return f"'{row[1] or '?'}' (pid {row[0]}, user {row[2]}, connected since {row[3]:%Y-%m-%d %H:%M:%S %Z})"

    def _release_lock(self, conn: Any) -> None:
        try:
            conn.rollback()
            with conn, conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s, %s)", [ADVISORY_LOCK_NAMESPACE, SCHEMA_MIGRATION_LOCK])
        except psycopg2.Error:
            self.log.warning("%s: could not release the migration lock; it goes with the connection", self.service)


class _Closing:
    """Close a psycopg2 connection at the end of a ``with`` block (psycopg2's own ``with`` only ends a transaction)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __enter__(self) -> Any:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _gaps(current: int, steps: list[Migration]) -> list[str]:
    """Describe the numbers a run of ``up`` steps skips (7 after 5: no 6), from the current version on."""
    gaps, previous = [], current
    for migration in steps:
        if previous != NOTHING_APPLIED and migration.version > previous + 1:
            missing = (str(previous + 1) if migration.version == previous + 2
                       else f"{previous + 1}-{migration.version - 1}")
            gaps.append(f"no migration numbered {missing} (between {previous} and {migration.label}); "
                        f"numbers need not be consecutive")
        previous = migration.version
    return gaps


def _pg_message(exc: BaseException) -> str:
    code = getattr(exc, "pgcode", None)
    text = str(getattr(exc, "pgerror", None) or exc).strip().replace("\n", " ")
    return f"[{code}] {text}" if code else text
