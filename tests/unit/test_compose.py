"""docker-compose.yaml cannot start here (no Docker engine): it is validated against the compose specification's JSON
schema and read by these tests, which check what would otherwise only fail on the first `docker compose up`."""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from omnisphere_release.catalog import load_catalog

REPO = Path(__file__).resolve().parents[2]
LOCAL_ENV_FILE = REPO / "compose.local.env"
LOCAL_CONNECTIONS = REPO / "include" / "local" / "connections.yaml"
AIRFLOW_PARTS = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                 "airflow-worker")
ONE_SHOT = ("airflow-init", "airflow-local-setup")  # run once and exit: nothing to health-check
SECRET_NAME = re.compile(r"PASSWORD|_SECRET$|_KEY$|TOKEN", re.IGNORECASE)
REQUIRED_VARIABLE = re.compile(r"\$\{(\w+):\?[^}]*\}")
# The only form a secret may take outside the local profile: a variable compose refuses to start without.
REQUIRED_REFERENCE = re.compile(r"^\$\{\w+:\?[^}]*\}$")
DEFAULTED_REFERENCE = re.compile(r"\$\{(\w+):?-([^}]+)\}")


SHARED_SETTINGS = REPO / "airflow.env"


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def env_file(path: Path) -> dict[str, str]:
    """Read an env file as compose does: KEY=VALUE lines, # comments."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("#"))


def container_env(service: dict) -> dict[str, str]:
    """What a container's environment would be: its env_file(s), then its environment (which wins)."""
    files = service.get("env_file", [])
    merged = {key: value for file in ([files] if isinstance(files, str) else files)
              for key, value in env_file(REPO / file).items()}
    return {**merged, **{key: str(value) for key, value in service.get("environment", {}).items()}}


def unshared(document: dict) -> dict:
    """A copy in which no two services share a mapping (YAML anchors do), so that a test can change one of them."""
    return json.loads(json.dumps(document))


def strings_in(node) -> list[str]:
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in strings_in(key) + strings_in(value)]
    if isinstance(node, list):
        return [text for item in node for text in strings_in(item)]
    return [node] if isinstance(node, str) else []


def compose_schema_errors(document: dict) -> list[str]:
    schema = json.loads(importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema, format_checker=jsonschema.FormatChecker())
    return [f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
            for error in validator.iter_errors(document)]


def plaintext_secrets(document: dict) -> list[str]:
    """Where a secret is written in the file itself, outside the local profile's throwaway defaults."""
    found = []
    for name, service in document["services"].items():
        if "local" in service.get("profiles", []):
            continue
        environment = service.get("environment", {})
        for key, value in environment.items():
            value = str(value)
            if SECRET_NAME.search(key) and not REQUIRED_REFERENCE.match(value):
                found.append(f"{name}: {key}")
            # a URL's password: postgresql://user:<password>@host
            for password in re.findall(r"://[^:/@\s]+:([^@\s]*)@", value):
                if not REQUIRED_REFERENCE.match(password):
                    found.append(f"{name}: the password in {key}")
            # a secret variable with a default: production would run on the default when it is not set
            for variable, _default in DEFAULTED_REFERENCE.findall(value):
                if SECRET_NAME.search(variable):
                    found.append(f"{name}: a default for {variable} in {key}")
    return found


def test_compose_file_follows_the_compose_specification():
    assert compose_schema_errors(compose()) == []


def test_the_schema_check_reports_a_broken_file():
    broken = unshared(compose())
    broken["services"]["airflow-worker"]["healthcheck"]["interval"] = ["30s"]
    broken["services"]["redis"]["restart_policy"] = "always"  # not a compose key
    errors = compose_schema_errors(broken)
    assert any("services/airflow-worker/healthcheck/interval" in error for error in errors), errors
    assert any("restart_policy" in error for error in errors), errors


def test_the_airflow_3_parts_are_present_with_healthchecks():
    services = compose()["services"]
    for name in ("postgres", "redis", *AIRFLOW_PARTS, *ONE_SHOT, "local-aws"):
        assert name in services, f"docker-compose.yaml has no {name} service"
    for name, service in services.items():
        if name not in ONE_SHOT:
            assert "healthcheck" in service, f"{name} has no healthcheck"
    for name in AIRFLOW_PARTS:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_every_airflow_part_shares_the_jwt_secret_fernet_key_and_executor():
    services = compose()["services"]
    for name in (*AIRFLOW_PARTS, *ONE_SHOT):
        environment = container_env(services[name])
        assert environment["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert environment["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${AIRFLOW_JWT_SECRET:?"), name
        assert environment["AIRFLOW__CORE__FERNET_KEY"].startswith("${AIRFLOW_FERNET_KEY:?"), name


def test_no_secret_is_written_in_the_file_outside_the_local_profile():
    assert plaintext_secrets(compose()) == []


def test_the_secret_check_finds_a_written_secret():
    leaky = unshared(compose())
    leaky["services"]["airflow-scheduler"]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] = "hunter2"  # noqa: S105 - the planted secret this test must find
    leaky["services"]["airflow-worker"]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = (
        "postgresql+psycopg2://airflow:${AIRFLOW_DB_PASSWORD:-airflow}@postgres/airflow")
    assert plaintext_secrets(leaky) == ["airflow-scheduler: AIRFLOW__API_AUTH__JWT_SECRET",
                                        "airflow-worker: the password in AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                                        "airflow-worker: a default for AIRFLOW_DB_PASSWORD in "
                                        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]


def test_the_local_env_file_sets_every_variable_compose_requires():
    required = {variable for text in strings_in(compose()) for variable in REQUIRED_VARIABLE.findall(text)}
    assert required, "docker-compose.yaml requires no variable: the secrets check has nothing to hold on to"
    local = env_file(LOCAL_ENV_FILE)
    assert sorted(required - local.keys()) == []
    assert local["COMPOSE_PROFILES"] == "local"


def test_mounted_and_referenced_paths_exist():
    document = compose()
    paths = ["Dockerfile", "requirements.txt", "requirements-dev.txt", "constraints.txt", LOCAL_ENV_FILE.name]
    for service in document["services"].values():
        paths += service.get("env_file", [])
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                paths.append(source)
    container_paths = {"/opt/airflow/include/": "include/"}
    command = document["services"]["airflow-local-setup"]["command"]
    for container_path, repo_path in container_paths.items():
        paths += [word.replace(container_path, repo_path) for word in command.split()
                  if word.startswith(container_path)]
    assert "include/local/connections.yaml" in paths
    missing = [path for path in paths if not (REPO / path).exists()]
    assert missing == []


def test_image_is_built_from_the_pinned_requirements():
    pinned = re.search(r"apache-airflow==([\d.]+)", (REPO / "requirements.txt").read_text()).group(1)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"AIRFLOW_VERSION={pinned}" in dockerfile
    assert "-r /opt/omnisphere/requirements.txt -c /opt/omnisphere/constraints.txt" in dockerfile
    document = compose()
    assert document["x-airflow-common"]["image"].endswith(pinned)
    for name in (*AIRFLOW_PARTS, *ONE_SHOT):  # built here, never pulled from a registry; the runtime set only
        assert document["services"][name]["build"] == {"context": ".", "target": "production"}, name
        assert document["services"][name]["image"] == document["x-airflow-common"]["image"], name
    # The AWS stand-in needs moto (the development set): an image of its own, never the one production runs.
    local_aws = document["services"]["local-aws"]
    assert local_aws["build"] == {"context": ".", "target": "local-dev"}
    assert local_aws["image"] != document["x-airflow-common"]["image"] and local_aws["image"].endswith(pinned)
    assert re.search(r"^FROM \S+ AS local-dev$", dockerfile, re.MULTILINE)


def test_every_airflow_part_reads_the_shared_settings_and_overrides_none():
    """airflow.env is the one source of the settings every deployment shares (the local Celery topology reads it
    too, see the next test); a container's own environment may not quietly change one."""
    shared = env_file(SHARED_SETTINGS)
    assert shared["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert all(key.startswith("AIRFLOW__") for key in shared)
    assert not any(SECRET_NAME.search(key) or "${" in value for key, value in shared.items()), (
        "airflow.env is shared by every deployment: no secret and no variable in it")
    services = compose()["services"]
    for name in (*AIRFLOW_PARTS, *ONE_SHOT):
        assert services[name]["env_file"] == [SHARED_SETTINGS.name], name
        overridden = sorted(shared.keys() & services[name].get("environment", {}).keys())
        assert overridden == [], f"{name} overrides shared settings of airflow.env: {overridden}"
        environment = container_env(services[name])
        assert {key: environment[key] for key in shared} == shared, name


def test_published_ports_bind_loopback_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def test_local_connections_reach_the_local_profile_services():
    """Every connection the catalog names is in the file airflow-local-setup imports, read as Airflow reads it, and
    points at a service of the local profile, with the user, database and password that service was created with."""
    from airflow.secrets.local_filesystem import load_connections_dict

    services = compose()["services"]
    connections = load_connections_dict(str(LOCAL_CONNECTIONS))
    local_aws = services["local-aws"]["entrypoint"]
    aws_port = int(local_aws[local_aws.index("--port") + 1])
    first_sample_port = int(local_aws[local_aws.index("--first-sample-port") + 1])
    assert connections["aws_default"].extra_dejson["endpoint_url"] == f"http://local-aws:{aws_port}"
    for index, service in enumerate(load_catalog(REPO / "include" / "services.yaml").services):
        database = connections[service.postgres_conn_id]
        assert "local" in services[database.host]["profiles"]
        environment = services[database.host]["environment"]
        assert (database.login, database.schema, database.password) == (
            environment["POSTGRES_USER"], environment["POSTGRES_DB"], environment["POSTGRES_PASSWORD"])
        # the sample services listen on consecutive ports in catalog order (devstack/aws.py)
        assert connections[service.http_conn_id].host == f"http://local-aws:{first_sample_port + index}"


@pytest.mark.parametrize("variable", ["AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY", "AIRFLOW_DB_PASSWORD",
                                      "OMNI_BACKUP_BUCKET", "OMNI_BACKUP_BUCKET_PRODUCTION", "OMNI_EVIDENCE_BUCKET",
                                      "REDIS_PASSWORD", "AIRFLOW_API_SECRET_KEY",
                                      "AIRFLOW_ADMIN_PASSWORD"])
def test_a_missing_secret_stops_compose_with_a_message_that_says_what_to_set(variable):
    messages = [message for text in strings_in(compose())
                for message in re.findall(rf"\$\{{{variable}:\?([^}}]*)\}}", text)]
    assert messages and all(f"set {variable}" in message for message in messages), messages


def test_the_local_celery_topology_runs_on_the_same_settings(tmp_path):
    """`make up EXECUTOR=celery` (devstack/topology.py) gives its parts airflow.env's settings, departs from them only
    where LOCAL_OVERRIDES says so, and sets each setting that compose sets per deployment (hosts and secrets)."""
    from devstack import topology

    ports = topology.Ports(api=18080, redis=16379, scheduler_health=18974, trigger_logs=18794,
                           worker_logs={"worker1": 18793, "worker2": 18795})
    env = topology.topology_env({}, tmp_path, ports, "postgresql+psycopg2://airflow:pw@127.0.0.1:5432/airflow")
    shared = env_file(SHARED_SETTINGS)
    assert topology.shared_settings() == shared
    assert set(topology.LOCAL_OVERRIDES) == {"AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "AIRFLOW__CORE__AUTH_MANAGER"}
    assert {key: env[key] for key in shared} == {**shared, **topology.LOCAL_OVERRIDES}
    per_deployment = {key for key in compose()["x-airflow-common"]["environment"]
                      if key.startswith("AIRFLOW__") and not key.startswith("AIRFLOW__SECRETS__")}
    assert per_deployment == {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND",
                              "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CORE__FERNET_KEY",
                              "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY",
                              "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"}
    assert sorted(per_deployment - env.keys()) == []
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://127.0.0.1:16379/0"
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+postgresql://airflow:pw@127.0.0.1:5432/airflow"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    # the secrets every part shares are generated once per home and kept private
    assert (tmp_path / topology.SECRETS_FILE).stat().st_mode & 0o777 == 0o600
    again = topology.topology_env({}, tmp_path, ports, "postgresql+psycopg2://airflow:pw@127.0.0.1:5432/airflow")
    assert again["AIRFLOW__API_AUTH__JWT_SECRET"] == env["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert again["AIRFLOW__API__SECRET_KEY"] == env["AIRFLOW__API__SECRET_KEY"]
    # Locally the simple auth manager, unless `make up AUTH=fab` asks for production's.
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
    fab = topology.topology_env({}, tmp_path, ports, "postgresql+psycopg2://airflow:pw@127.0.0.1:5432/airflow",
                                auth="fab")
    assert fab["AIRFLOW__CORE__AUTH_MANAGER"] == shared["AIRFLOW__CORE__AUTH_MANAGER"]


# ---- no open doors (#16): the broker, the metadata database and the API take credentials compose cannot start without
FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"


def required_variable(text: str) -> str | None:
    """The variable a value requires (``${NAME:?message}`` and nothing else), or None."""
    match = REQUIRED_REFERENCE.match(text)
    return re.match(r"^\$\{(\w+)", text).group(1) if match else None  # type: ignore[union-attr]


def open_doors(document: dict) -> list[str]:
    """Where a client could reach the broker, the metadata database or the API without a secret of this deployment."""
    found = []
    services = document["services"]
    common = container_env(services["airflow-apiserver"])
    broker = urlsplit_password(common["AIRFLOW__CELERY__BROKER_URL"])
    broker_variable = required_variable(broker or "")
    if broker_variable is None:
        found.append(f"the broker URL takes no required password: {common['AIRFLOW__CELERY__BROKER_URL']}")
    redis = services["redis"]
    server_conf = " ".join(strings_in(redis.get("command", "")))
    if "requirepass $$REDIS_PASSWORD" not in server_conf or required_variable(
            str(redis.get("environment", {}).get("REDIS_PASSWORD", ""))) != broker_variable:
        found.append("redis-server does not require the broker URL's password (requirepass)")
    if redis.get("ports"):
        found.append("redis is published beyond the compose network")
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"):
        if required_variable(urlsplit_password(common[key]) or "") is None:
            found.append(f"{key} takes no required password")
    postgres = services["postgres"]["environment"]
    if required_variable(str(postgres.get("POSTGRES_PASSWORD", ""))) is None or "POSTGRES_HOST_AUTH_METHOD" in postgres:
        found.append("the metadata PostgreSQL does not require its password")
    if services["postgres"].get("ports"):
        found.append("the metadata PostgreSQL is published beyond the compose network")
    for name in (*AIRFLOW_PARTS, *ONE_SHOT):
        environment = container_env(services[name])
        if environment.get("AIRFLOW__CORE__AUTH_MANAGER") != FAB_AUTH_MANAGER:
            found.append(f"{name} does not run the FAB auth manager: {environment.get('AIRFLOW__CORE__AUTH_MANAGER')}")
        if any(key.startswith("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER") for key in environment):
            found.append(f"{name} configures the simple auth manager's users")
        if required_variable(environment.get("AIRFLOW__API__SECRET_KEY", "")) is None:
            found.append(f"{name}: the API's session key is not a required variable")
    init = " ".join(services["airflow-init"]["command"])
    if "omnisphere_release.access sync" not in init or "omnisphere_release.access admin" not in init:
        found.append("airflow-init does not sync the roles from the catalog and create the first Admin")
    if required_variable(str(services["airflow-init"]["environment"].get("AIRFLOW_ADMIN_PASSWORD", ""))) is None:
        found.append("the first Admin's password is not a required variable")
    return found


def urlsplit_password(url: str) -> str | None:
    """The password of ``scheme://user:password@host`` as written (a ``${...}`` reference is kept whole)."""
    match = re.match(r"^[\w+]+://[^:/@]*:(.*)@[^@]+$", url)
    return match.group(1) if match else None


def test_the_broker_the_metadata_database_and_the_api_require_credentials():
    assert open_doors(compose()) == []


def test_the_open_door_check_finds_each_planted_door():
    doors = unshared(compose())
    common = doors["x-airflow-common"]["environment"]
    for name in (*AIRFLOW_PARTS, *ONE_SHOT):
        service = doors["services"][name]
        service["environment"] = {**common, **service.get("environment", {})}
    doors["services"]["airflow-worker"]["environment"]["AIRFLOW__CELERY__BROKER_URL"] = "redis://:@redis:6379/0"
    doors["services"]["airflow-apiserver"]["environment"]["AIRFLOW__CELERY__BROKER_URL"] = "redis://:@redis:6379/0"
    doors["services"]["redis"]["command"] = ["redis-server"]
    doors["services"]["airflow-scheduler"]["environment"]["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "true"
    doors["services"]["postgres"]["environment"]["POSTGRES_HOST_AUTH_METHOD"] = "trust"
    doors["services"]["airflow-init"]["command"] = ["-c", "airflow db migrate"]
    found = open_doors(doors)
    assert found[:3] == ["the broker URL takes no required password: redis://:@redis:6379/0",
                         "redis-server does not require the broker URL's password (requirepass)",
                         "the metadata PostgreSQL does not require its password"], found
    assert "airflow-scheduler configures the simple auth manager's users" in found
    assert "airflow-init does not sync the roles from the catalog and create the first Admin" in found


def test_production_runs_the_fab_auth_manager_from_the_runtime_set():
    """The auth manager airflow.env names is installed by the image (requirements.txt) and resolves to the class."""
    import importlib

    from airflow.providers.fab.auth_manager.fab_auth_manager import FabAuthManager

    module, _, name = env_file(SHARED_SETTINGS)["AIRFLOW__CORE__AUTH_MANAGER"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is FabAuthManager
    assert re.search(r"^apache-airflow-providers-fab$", (REPO / "requirements.txt").read_text(), re.MULTILINE)


def interpolate(text: str, variables: dict[str, str]) -> str:
    """What compose makes of a value: ``${NAME:?message}`` and ``${NAME}`` replaced, ``$$`` turned into ``$``."""
    text = re.sub(r"\$\{(\w+)(:?[?-][^}]*)?\}", lambda match: variables[match.group(1)], text)
    return text.replace("$$", "$")


@pytest.mark.skipif(not shutil.which("redis-server"), reason="Debian's redis-server is not installed")
def test_the_broker_refuses_a_client_without_the_password_and_takes_the_broker_url(tmp_path):
    """Run the compose file's own Redis command (on a free loopback port instead of 6379): a client without the
    password is refused, the Celery broker URL compose gives every Airflow part is let in."""
    import redis

    from devstack.net import free_port

    services = compose()["services"]
    script = interpolate(services["redis"]["command"][2], {})
    port = free_port()
    assert "exec redis-server - <<EOF" in script
    script = script.replace("redis-server -", f"redis-server - --port {port} --bind 127.0.0.1 --save '' "
                                              f"--dir {tmp_path}", 1)
    password = "test-only-broker-password"  # noqa: S105 - a throwaway for this Redis
    variables = {"REDIS_PASSWORD": password}
    environment = {key: interpolate(str(value), variables) for key, value in services["redis"]["environment"].items()}
    server = subprocess.Popen(["sh", "-c", script], env={**environment, "PATH": "/usr/bin:/bin"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        anonymous = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        for _ in range(50):
            try:
                anonymous.ping()
            except redis.AuthenticationError:
                break  # up, and it wants a password
            except redis.ConnectionError:
                time.sleep(0.1)
        else:
            raise AssertionError("the compose file's Redis never asked for a password")
        broker = interpolate(container_env(services["airflow-worker"])["AIRFLOW__CELERY__BROKER_URL"],
                             variables).replace("@redis:6379", f"@127.0.0.1:{port}")
        assert redis.Redis.from_url(broker).ping() is True
        assert environment["REDISCLI_AUTH"] == password  # the healthcheck's redis-cli signs in the same way
    finally:
        server.terminate()
        server.wait(timeout=10)
