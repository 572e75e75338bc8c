"""The service catalog: include/services.yaml validated into typed, immutable records.

Every error names the catalog file and the field at fault (``services[1] (billing-service).ecs.clustr``) and says
what to do, because a broken catalog surfaces as a DAG import error that someone has to fix quickly.
Reading the catalog touches only local files, so DAG files may call :func:`load_catalog` at parse time.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CATALOG = PROJECT_ROOT / "include" / "services.yaml"
DEFAULT_SQL_DIR = PROJECT_ROOT / "include" / "sql"

TOP_LEVEL_KEYS = {"services", "release_all_window", "release_train", "environments", "default_environment", "teams",
                  "evidence_bucket_variable"}
SERVICE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}[a-z0-9]$")
DeployStrategy = Literal["rolling", "blue_green", "canary", "linear"]


class CatalogError(ValueError):
    """The catalog file cannot be used; the message names the file and the field."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EcsTarget(_Record):
    cluster: str = Field(min_length=1)
    service: str = Field(min_length=1)
    container: str = Field(min_length=1)
    desired_count: int = Field(default=2, ge=1, le=100)


class DeployStep(_Record):
    # One step of a canary or linear deployment: this share of the traffic on the new version, watched this long.
    percent: int = Field(ge=1, le=100)
    bake_minutes: float = Field(default=2, ge=0, le=24 * 60)


class DeployPolicy(_Record):
    strategy: DeployStrategy = "rolling"
    timeout_minutes: int = Field(default=20, ge=1, le=24 * 60)
    bake_minutes: float = Field(default=5, ge=0, le=24 * 60)
    # How long a release takes, until earlier releases' reports tell better; a window with less room left is refused.
    estimated_minutes: float = Field(default=20, gt=0, le=24 * 60)
    # Canary and linear: the traffic steps, each baked and analysed before the next (the last must be 100).
    steps: tuple[DeployStep, ...] = ()

    @field_validator("steps")
    @classmethod
    def _steps_rise_to_100(cls, value: tuple[DeployStep, ...]) -> tuple[DeployStep, ...]:
        percents = [step.percent for step in value]
        if value and (percents != sorted(set(percents)) or percents[-1] != 100):
            raise ValueError(f"steps {percents} must rise strictly and end at 100, e.g. 10, 50, 100")
        return value

    @model_validator(mode="after")
    def _steps_ecs_can_run(self) -> DeployPolicy:
        # The one rule for a canary's or linear's steps, shared with a run's steps param (ecs_deploy checks those):
        # ECS's CANARY is [p, 100], its LINEAR equal shares with equal bakes.
        from omnisphere_release.hooks.ecs import STEPPED, steps_problem

        if self.steps and self.strategy in STEPPED and (
                problem := steps_problem(self.strategy, [step.model_dump() for step in self.steps])):
            raise ValueError(problem)
        return self


class SmokeTest(_Record):
    path: str = Field(pattern=r"^/")
    expect_status: int = Field(default=200, ge=100, le=599)
    expect_json: dict[str, object] = Field(default_factory=dict)
    expect_fields: tuple[str, ...] = ()
    latency_budget_ms: int = Field(default=1000, ge=1)


class LogCheck(_Record):
    # The CloudWatch Logs group the service's tasks write to; the bake reads the new task set's streams in it.
    log_group: str = Field(min_length=1)
    # CloudWatch Logs filter patterns that mark an error line (e.g. '"ERROR"', '?Traceback ?FATAL').
    error_patterns: tuple[str, ...] = Field(min_length=1)
    # More matching lines than this during the bake fails the release.
    max_error_lines: int = Field(default=0, ge=0)


class RegressionSuite(_Record):
    # The ECS task definition (family or family:revision) of the service's regression suite, run as a one-off task.
    task_definition: str = Field(min_length=1)
    container: str = Field(min_length=1)
    timeout_minutes: int = Field(default=15, ge=1, le=24 * 60)


class MonitoringThresholds(_Record):
    # The service's ALB target group, as the CloudWatch dimension value ``targetgroup/<name>/<id>``.
    target_group: str = Field(pattern=r"^targetgroup/[A-Za-z0-9-]+/[0-9a-f]+$")
    max_error_rate: float = Field(ge=0, le=1)
    max_p99_latency_ms: int = Field(ge=1)
    missing_data_minutes: float = Field(default=3, gt=0)
    alarms: tuple[str, ...] = ()
    logs: LogCheck | None = None


class MaintenanceWindow(_Record):
    cron: str
    duration_minutes: int = Field(ge=1, le=24 * 60)
    timezone: str = "UTC"
    # A release may be triggered for a start at most this far ahead: a run waiting longer only holds a place.
    max_days_ahead: int = Field(default=14, ge=1, le=366)

    @field_validator("cron")
    @classmethod
    def _cron_is_valid(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a 5-field cron expression (e.g. '0 2 * * SUN')")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone_exists(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. 'Europe/Paris' or 'UTC')") from None
        return value


class MigrationSettings(_Record):
    # A few seconds at most: a migration waiting longer for a lock queues the application's queries behind it.
    lock_timeout_ms: int = Field(default=3000, ge=100, le=10_000)
    statement_timeout_ms: int = Field(default=300_000, ge=1000)
    lock_retries: int = Field(default=5, ge=0, le=50)
    # The squawk rules whose findings block a plan when they touch a table that exists and holds rows;
    # None means the engine's documented default (migrations/lint.py DEFAULT_BLOCKING_RULES).
    blocking_rules: tuple[str, ...] | None = None


class IntegrityPolicy(_Record):
    # Share of a touched table's rows that may disappear during a release (the application keeps writing
    # meanwhile); growth is always fine. A migration that deletes rows on purpose raises this for its service.
    max_row_loss: float = Field(default=0.01, ge=0, le=1)


class Environment(_Record):
    """Where a service runs: each environment has its own databases, ECS cluster and backup bucket."""

    name: str
    # Appended to every service's postgres_conn_id and http_conn_id (``omni_pg_auth_service`` + ``_production``).
    connection_suffix: str = Field(default="", pattern=r"^[a-z0-9_]*$")
    ecs_cluster: str | None = None  # None: each service's ecs.cluster
    aws_conn_id: str | None = None  # None: each service's aws_conn_id
    # The Airflow Variable naming the S3 bucket of this environment's pre-release backups.
    backup_bucket_variable: str = "omni_backup_bucket"
    # Production rules: a reason, the maintenance window and a backup for every standalone change.
    production: bool = False
    # A release here needs evidence: a successful release of the same image digest, with the same migration and
    # data-migration checksums, in this environment, no older than evidence_max_age_hours.
    promote_from: str | None = None
    evidence_max_age_hours: float = Field(default=168, gt=0, le=24 * 366)
    # Four eyes: a release here waits at approve_release for one of the service's approvers.
    approval: bool = False
    approval_timeout_hours: float = Field(default=24, gt=0, le=24 * 14)


class Team(_Record):
    """Who a service belongs to: where its release news goes."""

    # SNS topic ARNs that get every release outcome of the team's services.
    sns_topics: tuple[str, ...] = ()
    # E-mail addresses (through the smtp_default connection), if any.
    emails: tuple[str, ...] = ()


class ReleaseTrain(_Record):
    # How many services release_all releases at once (a run may lower or raise it with its max_parallel param).
    max_parallel: int = Field(default=4, ge=1, le=50)


class Service(_Record):
    name: str
    description: str = ""
    team: str = ""
    postgres_conn_id: str = Field(min_length=1)
    http_conn_id: str = Field(min_length=1)
    aws_conn_id: str = "aws_default"
    ecs: EcsTarget
    deploy: DeployPolicy = DeployPolicy()
    smoke_tests: tuple[SmokeTest, ...] = Field(min_length=1)
    monitoring: MonitoringThresholds
    maintenance_window: MaintenanceWindow
    migrations: MigrationSettings = MigrationSettings()
    integrity: IntegrityPolicy = IntegrityPolicy()
    smoke_deadline_seconds: float = Field(default=30, gt=0, le=3600)
    regression: RegressionSuite | None = None
    # Who may approve a release of this service where its environment requires approval (never the triggering user).
    approvers: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, value: str) -> str:
        if not SERVICE_NAME.match(value):
            raise ValueError(f"{value!r} must be lower-case letters, digits and '-' (it becomes a DAG id)")
        return value

    def in_environment(self, environment: Environment) -> Service:
        """Return this service as it runs in ``environment``: its connections, cluster and AWS connection there."""
        update: dict[str, object] = {"postgres_conn_id": self.postgres_conn_id + environment.connection_suffix,
                                     "http_conn_id": self.http_conn_id + environment.connection_suffix}
        if environment.aws_conn_id:
            update["aws_conn_id"] = environment.aws_conn_id
        if environment.ecs_cluster:
            update["ecs"] = self.ecs.model_copy(update={"cluster": environment.ecs_cluster})
        return self.model_copy(update=update)

    @property
    def env_suffix(self) -> str:
        """Return the name as used in environment variables: ``auth-service`` -> ``AUTH_SERVICE``."""
        return self.name.upper().replace("-", "_")


class Catalog(_Record):
    path: Path
    sql_dir: Path
    services: tuple[Service, ...]
    # When release_all releases the queued manifest; None: release_all runs only when triggered.
    release_all_window: MaintenanceWindow | None = None
    release_train: ReleaseTrain = ReleaseTrain()
    environments: tuple[Environment, ...] = (Environment(name="default"),)
    default_environment: str = "default"
    teams: dict[str, Team] = Field(default_factory=dict)
    # The Airflow Variable naming the S3 bucket where every release's report is kept as evidence for promotions.
    evidence_bucket_variable: str = "omni_evidence_bucket"

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.services]

    @property
    def environment_names(self) -> list[str]:
        return [e.name for e in self.environments]

    def environment(self, name: str | None = None) -> Environment:
        """Return the environment called ``name`` (None or "": the default one); refuse an unknown name."""
        wanted = name or self.default_environment
        for environment in self.environments:
            if environment.name == wanted:
                return environment
        raise CatalogError(f"{self.path}: unknown environment {wanted!r} (param 'environment'); known environments: "
                           f"{', '.join(self.environment_names)}")

    def get(self, name: str, environment: str | None = None) -> Service:
        """Return the service ``name`` as it runs in ``environment`` (None or "": the default environment)."""
        for service in self.services:
            if service.name == name:
                return service.in_environment(self.environment(environment))
        raise CatalogError(f"{self.path}: unknown service {name!r}; known services: {', '.join(self.names)}")

    def team(self, name: str) -> Team:
        return self.teams.get(name) or Team()

    def release_order(self, names: list[str] | None = None) -> list[Service]:
        """Return services so that each comes after everything it depends on (catalog order breaks ties)."""
        wanted = set(names) if names is not None else set(self.names)
        ordered: list[Service] = []
        done: set[str] = set()
        pending = [s for s in self.services if s.name in wanted]
        while pending:
            ready = [s for s in pending if all(d in done or d not in wanted for d in s.depends_on)]
            # validate() rejects cycles, so there is always a ready service here.
            ordered.append(ready[0])
            done.add(ready[0].name)
            pending.remove(ready[0])
        return ordered

    def migrations_dir(self, service: str) -> Path:
        return self.sql_dir / service / "migrations"

    def checks_dir(self, service: str) -> Path:
        return self.sql_dir / service / "checks"

    def has_data_migrations(self, service: str) -> bool:
        """Return whether the service has data migration specs (its release DAG then has a data_migrate stage)."""
        return any((self.sql_dir / service / "data").glob("*.yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key written twice in one mapping (plain YAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[object, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise CatalogError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                f"(first at line {seen[key] + 1}); remove one of them"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _field_path(raw_services: list, loc: tuple) -> str:
    """Render a pydantic error location as ``services[1] (billing-service).ecs.cluster``."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
            if i == 1 and isinstance(raw_services, list) and item < len(raw_services):
                entry = raw_services[item]
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                    parts[-1] += f" ({entry['name']})"
        else:
            parts.append(str(item))
    return ".".join(parts)


def _find_cycle(services: tuple[Service, ...]) -> list[str] | None:
    graph = {s.name: s.depends_on for s in services}
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "visiting"
        stack.append(name)
        for dep in graph.get(name, ()):
            if state.get(dep) == "visiting":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[name] = "done"
        return None

    for name in graph:
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def parse_catalog(text: str, path: Path, sql_dir: Path) -> Catalog:
    """Validate catalog text; raise CatalogError naming ``path`` and the field at fault."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except CatalogError as exc:
        raise CatalogError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or "services" not in raw or set(raw) - TOP_LEVEL_KEYS:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise CatalogError(f"{path}: the top level must be a mapping of 'services' and optionally "
                           f"{', '.join(repr(k) for k in sorted(TOP_LEVEL_KEYS - {'services'}))} (found {found})")
    raw_services = raw["services"]
    if not isinstance(raw_services, list) or not raw_services:
        raise CatalogError(f"{path}: field 'services' must be a non-empty list of service entries")

    try:
        services = tuple(Service.model_validate(entry) for entry in raw_services)
    except ValidationError as exc:
        index = raw_services.index(next(e for e in raw_services if not _is_valid(e)))
        errors = []
        for err in exc.errors():
            field = _field_path(raw_services, ("services", index, *err["loc"]))
            message = "unknown key; remove it or check its spelling" if err["type"] == "extra_forbidden" else err["msg"]
            errors.append(f"{path}: field {field}: {message}")
        raise CatalogError("\n".join(errors)) from None

    seen: dict[str, int] = {}
    for i, service in enumerate(services):
        if service.name in seen:
            raise CatalogError(
                f"{path}: field services[{i}].name: duplicate service name {service.name!r} "
                f"(also services[{seen[service.name]}]); service names must be unique"
            )
        seen[service.name] = i
    for i, service in enumerate(services):
        for dep in service.depends_on:
            if dep not in seen:
                raise CatalogError(
                    f"{path}: field services[{i}] ({service.name}).depends_on: unknown service {dep!r}; "
                    f"known services: {', '.join(seen)}"
                )
            if dep == service.name:
                raise CatalogError(f"{path}: field services[{i}] ({service.name}).depends_on: a service cannot depend on itself")
    if cycle := _find_cycle(services):
        raise CatalogError(f"{path}: field depends_on: dependency cycle {' -> '.join(cycle)}; break one of these links")
    for i, service in enumerate(services):
        folder = sql_dir / service.name / "migrations"
        if not folder.is_dir():
            raise CatalogError(
                f"{path}: field services[{i}] ({service.name}): missing SQL folder {folder}; "
                f"create it (it may be empty) or fix the service name"
            )
    release_all_window = None
    if raw.get("release_all_window") is not None:
        try:
            release_all_window = MaintenanceWindow.model_validate(raw["release_all_window"])
        except ValidationError as exc:
            err = exc.errors()[0]
            raise CatalogError(f"{path}: field release_all_window.{'.'.join(map(str, err['loc']))}: "
                               f"{'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}") from None
    try:
        release_train = ReleaseTrain.model_validate(raw.get("release_train") or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise CatalogError(f"{path}: field release_train.{'.'.join(map(str, err['loc']))}: "
                           f"{'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}") from None
    environments, default_environment = _environments(raw, path)
    teams = {}
    for team_name, team in (raw.get("teams") or {}).items():
        try:
            teams[str(team_name)] = Team.model_validate(team or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            raise CatalogError(f"{path}: field teams.{team_name}.{'.'.join(map(str, err['loc']))}: "
                               f"{'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}") from None
    for i, service in enumerate(services):
        if service.team and teams and service.team not in teams:
            raise CatalogError(f"{path}: field services[{i}] ({service.name}).team: unknown team {service.team!r}; "
                               f"add it under 'teams' (known: {', '.join(teams)})")
    extra = {"evidence_bucket_variable": raw["evidence_bucket_variable"]} if raw.get("evidence_bucket_variable") else {}
    return Catalog(path=path, sql_dir=sql_dir, services=services, release_all_window=release_all_window,
                   release_train=release_train, environments=environments, default_environment=default_environment,
                   teams=teams, **extra)


def _environments(raw: dict, path: Path) -> tuple[tuple[Environment, ...], str]:
    """Read 'environments' (a mapping of name to settings) and 'default_environment'; a catalog without them has one
    environment, ``default``, in which every service uses its own connections and cluster."""
    if not raw.get("environments"):
        return (Environment(name="default"),), "default"
    if not isinstance(raw["environments"], dict):
        raise CatalogError(f"{path}: field environments must map environment names to their settings")
    environments = []
    for name, settings in raw["environments"].items():
        if not isinstance(name, str) or not SERVICE_NAME.match(name):
            raise CatalogError(f"{path}: field environments.{name}: environment names are lower-case slugs")
        try:
            environments.append(Environment.model_validate({**(settings or {}), "name": name}))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise CatalogError(f"{path}: field environments.{name}.{'.'.join(map(str, err['loc']))}: "
                               f"{'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}") from None
    names = [e.name for e in environments]
    for environment in environments:
        if environment.promote_from and environment.promote_from not in names:
            raise CatalogError(f"{path}: field environments.{environment.name}.promote_from: unknown environment "
                               f"{environment.promote_from!r}; known: {', '.join(names)}")
    default = raw.get("default_environment") or names[0]
    if default not in names:
        raise CatalogError(f"{path}: field default_environment: unknown environment {default!r}; known: "
                           f"{', '.join(names)}")
    return tuple(environments), default


def _is_valid(entry: object) -> bool:
    try:
        Service.model_validate(entry)
    except ValidationError:
        return False
    return True


def catalog_path() -> Path:
    return Path(os.environ.get("OMNISPHERE_CATALOG") or DEFAULT_CATALOG)


def sql_dir() -> Path:
    return Path(os.environ.get("OMNISPHERE_SQL_DIR") or DEFAULT_SQL_DIR)


def load_catalog(path: Path | str | None = None, sql_root: Path | str | None = None) -> Catalog:
    """Load and validate the catalog (``OMNISPHERE_CATALOG`` / ``OMNISPHERE_SQL_DIR`` override the defaults)."""
    path = Path(path) if path is not None else catalog_path()
    root = Path(sql_root) if sql_root is not None else sql_dir()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise CatalogError(f"{path}: catalog file not found; set OMNISPHERE_CATALOG or create it") from None
    return _load_cached(path.resolve(), root.resolve(), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _load_cached(path: Path, root: Path, _mtime_ns: int, _size: int) -> Catalog:
    # The DAG processor re-parses often; the cache key includes mtime and size so an edit is seen at once.
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_catalog(text, path, root)
