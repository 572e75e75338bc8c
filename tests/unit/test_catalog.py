"""The catalog: the real file validates, and every kind of mistake names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from omnisphere_release.catalog import CatalogError, load_catalog, parse_catalog

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "include" / "services.yaml"
SQL = REPO / "include" / "sql"


def raw_catalog() -> dict:
    return yaml.safe_load(CATALOG.read_text())


def parse(data: dict, sql_dir: Path = SQL, path: Path = Path("/etc/omni/services.yaml")):
    return parse_catalog(yaml.safe_dump(data, sort_keys=False), path, sql_dir)


def test_the_project_catalog_validates_with_three_services_in_release_order():
    catalog = load_catalog(CATALOG, SQL)
    assert catalog.names == ["auth-service", "billing-service", "notification-service"]
    assert [s.name for s in catalog.release_order()] == catalog.names
    auth = catalog.get("auth-service")
    assert auth.ecs.cluster == "omnisphere" and auth.smoke_tests[0].path == "/health"
    assert auth.env_suffix == "AUTH_SERVICE"
    assert auth.migrations.lock_timeout_ms <= 5000


def test_release_order_puts_dependencies_first_whatever_the_file_order():
    data = raw_catalog()
    data["services"].reverse()  # notification, billing, auth
    catalog = parse(data)
    assert [s.name for s in catalog.release_order()] == ["auth-service", "billing-service", "notification-service"]
    assert [s.name for s in catalog.release_order(["notification-service", "auth-service"])] == [
        "auth-service", "notification-service"]


def test_unknown_key_names_file_service_and_field():
    data = raw_catalog()
    data["services"][1]["ecs"]["clustr"] = "typo"
    with pytest.raises(CatalogError) as err:
        parse(data)
    message = str(err.value)
    assert "/etc/omni/services.yaml" in message
    assert "services[1] (billing-service).ecs.clustr" in message
    assert "unknown key" in message


def test_duplicate_service_name_is_refused():
    data = raw_catalog()
    data["services"][2]["name"] = "auth-service"
    with pytest.raises(CatalogError, match=r"services\[2\]\.name: duplicate service name 'auth-service'"):
        parse(data)


def test_duplicate_yaml_key_is_refused_with_its_line(tmp_path):
    text = CATALOG.read_text().replace("    team: identity\n", "    team: identity\n    team: other\n", 1)
    with pytest.raises(CatalogError, match=r"duplicate key 'team' at line \d+"):
        parse_catalog(text, CATALOG, SQL)


def test_missing_sql_folder_names_the_folder(tmp_path):
    (tmp_path / "auth-service" / "migrations").mkdir(parents=True)
    (tmp_path / "billing-service" / "migrations").mkdir(parents=True)
    with pytest.raises(CatalogError) as err:
        parse(raw_catalog(), sql_dir=tmp_path)
    assert "services[2] (notification-service)" in str(err.value)
    assert str(tmp_path / "notification-service" / "migrations") in str(err.value)


def test_dependency_cycle_is_refused_and_shown():
    data = raw_catalog()
    data["services"][0]["depends_on"] = ["notification-service"]
    with pytest.raises(CatalogError, match="dependency cycle .*auth-service.*notification-service"):
        parse(data)


def test_unknown_dependency_is_refused():
    data = raw_catalog()
    data["services"][0]["depends_on"] = ["payments-service"]
    with pytest.raises(CatalogError, match=r"services\[0\] \(auth-service\)\.depends_on: unknown service 'payments-service'"):
        parse(data)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("maintenance_window.cron", "every sunday", "not a 5-field cron expression"),
    ("maintenance_window.timezone", "Europe/Pariss", "not an IANA time zone"),
    ("deploy.strategy", "big_bang", "deploy.strategy"),
    ("monitoring.max_error_rate", 2, "monitoring.max_error_rate"),
    ("name", "Auth_Service", "lower-case letters"),
])
def test_invalid_values_name_the_field(field, value, expected):
    data = raw_catalog()
    node = data["services"][0]
    *parents, leaf = field.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(CatalogError, match=expected):
        parse(data)


def test_top_level_must_be_services_only():
    with pytest.raises(CatalogError, match="a mapping of 'services' and optionally .*'release_all_window'"):
        parse({"services": raw_catalog()["services"], "extra": 1})


def test_environment_overrides_catalog_and_sql_dir(tmp_path, monkeypatch):
    data = raw_catalog()
    data["services"] = data["services"][:1]
    (tmp_path / "sql" / "auth-service" / "migrations").mkdir(parents=True)
    catalog_file = tmp_path / "services.yaml"
    catalog_file.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("OMNISPHERE_CATALOG", str(catalog_file))
    monkeypatch.setenv("OMNISPHERE_SQL_DIR", str(tmp_path / "sql"))
    assert load_catalog().names == ["auth-service"]
