"""Roles from the catalog, the sync's plan, and the force-window rule, without a live Airflow: the permissions are
checked with the FAB auth manager's own authorization code, the sync against a security manager that keeps its roles
in memory, the guard as the ASGI middleware it is."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from omnisphere_release import access, client
from omnisphere_release.catalog import parse_catalog

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "include" / "services.yaml"
SQL = REPO / "include" / "sql"
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"


def catalog(edit=None):
    data = yaml.safe_load(CATALOG.read_text())
    if edit:
        edit(data)
    return parse_catalog(yaml.safe_dump(data, sort_keys=False), Path("/etc/omni/services.yaml"), SQL)


def may(role_permissions, method: str, dag_id: str, entity: str | None = None) -> bool:
    """Ask the FAB auth manager's own code whether a user holding ``role_permissions`` may do this."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.providers.fab.auth_manager.fab_auth_manager import FabAuthManager

    user = SimpleNamespace(perms=set(role_permissions))
    return FabAuthManager().is_authorized_dag(method=method, user=user, details=DagDetails(id=dag_id),
                                              access_entity=DagAccessEntity[entity] if entity else None)


def trigger(permissions, dag_id):
    return may(permissions, "POST", dag_id, "RUN")


def test_each_team_triggers_and_clears_its_own_services_release_and_rollback_only():
    roles = access.roles_from_catalog(catalog())
    assert set(roles) == {"identity-release", "payments-release", "engagement-release", "release-manager", "viewer"}
    identity = roles["identity-release"]
    assert trigger(identity, "release_auth-service") and trigger(identity, "rollback_auth-service")
    assert may(identity, "PUT", "rollback_auth-service", "TASK_INSTANCE")  # clear
    for dag_id in ("release_billing-service", "rollback_billing-service", "release_all", "queue_release",
                   "schema_migrations"):
        assert not trigger(identity, dag_id), dag_id
        assert not may(identity, "PUT", dag_id, "TASK_INSTANCE"), dag_id
    assert may(identity, "GET", "release_auth-service", "TASK_LOGS")
    assert not may(identity, "GET", "release_billing-service", "RUN")
    assert not may(identity, "PUT", "release_auth-service", "HITL_DETAIL")  # approving is the release manager's


def test_the_release_manager_runs_the_train_and_approves_and_the_viewer_changes_nothing():
    roles = access.roles_from_catalog(catalog())
    manager, viewer = roles["release-manager"], roles["viewer"]
    for dag_id in ("release_all", "queue_release", "release_billing-service", "rollback_notification-service"):
        assert trigger(manager, dag_id), dag_id
        assert may(viewer, "GET", dag_id, "TASK_LOGS") and may(viewer, "GET", dag_id, "XCOM"), dag_id
        assert not trigger(viewer, dag_id) and not may(viewer, "PUT", dag_id, "TASK_INSTANCE"), dag_id
        assert not may(viewer, "PUT", dag_id), dag_id  # nor pause it
    assert may(manager, "PUT", "release_auth-service", "HITL_DETAIL")
    assert not trigger(manager, "schema_migrations")  # standalone database changes stay with Admin
    assert {action for action, _ in viewer} <= {"can_read", "menu_access"} | {"can_edit"}
    assert {resource for action, resource in viewer if action == "can_edit"} == {"My Profile", "My Password"}


def test_the_names_are_the_fab_providers():
    from airflow.providers.fab.www.security import permissions

    assert (access.DAGS, access.DAG_RUNS, access.TASK_INSTANCES, access.HITL_DETAIL) == (
        permissions.RESOURCE_DAG, permissions.RESOURCE_DAG_RUN, permissions.RESOURCE_TASK_INSTANCE,
        permissions.RESOURCE_HITL_DETAIL)
    assert access.dag_resource("release_x") == permissions.resource_name("release_x", permissions.RESOURCE_DAG)
    known = {value for name, value in vars(permissions).items() if name.startswith("RESOURCE_")
             and isinstance(value, str)}
    for permissions_of_role in access.roles_from_catalog(catalog()).values():
        for action, resource in permissions_of_role:
            assert action in {permissions.ACTION_CAN_READ, permissions.ACTION_CAN_EDIT,
                              permissions.ACTION_CAN_CREATE, permissions.ACTION_CAN_ACCESS_MENU}
            assert resource in known or resource.startswith(permissions.RESOURCE_DAG_PREFIX), resource


class MemorySecurityManager:
    """The part of FAB's security manager that the sync calls, over roles kept in memory."""

    def __init__(self, roles: dict[str, set]):
        self.roles = {name: SimpleNamespace(name=name, permissions=[self._permission(*p) for p in held])
                      for name, held in roles.items()}
        self.calls = 0

    @staticmethod
    def _permission(action, resource):
        return SimpleNamespace(action=SimpleNamespace(name=action), resource=SimpleNamespace(name=resource))

    def get_all_roles(self):
        return list(self.roles.values())

    def find_role(self, name):
        return self.roles.get(name)

    def add_role(self, name):
        self.calls += 1
        self.roles[name] = SimpleNamespace(name=name, permissions=[])
        return self.roles[name]

    def create_permission(self, action, resource):
        return self._permission(action, resource)

    get_permission = create_permission

    def add_permission_to_role(self, role, permission):
        self.calls += 1
        role.permissions.append(permission)

    def remove_permission_from_role(self, role, permission):
        self.calls += 1
        key = (permission.action.name, permission.resource.name)
        role.permissions = [p for p in role.permissions if (p.action.name, p.resource.name) != key]


def sync_once(sm, wanted):
    changes = access.plan_sync(wanted, access.database_roles(sm))
    access.apply_sync(changes, sm)
    return changes


def test_the_sync_is_idempotent_and_leaves_other_roles_alone():
    admin = {("can_edit", "DAGs"), ("can_read", "Roles")}
    by_hand = {("can_read", "DAGs")}
    sm = MemorySecurityManager({"Admin": admin, "Viewer": by_hand, "oncall": by_hand})
    wanted = access.roles_from_catalog(catalog())
    first = sync_once(sm, wanted)
    assert {change.role for change in first} == set(wanted) and all(change.create for change in first)
    assert access.database_roles(sm) == {**{role: set(p) for role, p in wanted.items()},
                                         "Admin": admin, "Viewer": by_hand, "oncall": by_hand}
    calls = sm.calls
    assert sync_once(sm, wanted) == [] and sm.calls == calls  # the second run changes nothing


def test_a_service_that_changes_team_moves_and_a_team_that_leaves_is_emptied():
    sm = MemorySecurityManager({})
    sync_once(sm, access.roles_from_catalog(catalog()))
    sm.roles["identity-release"].permissions.append(sm._permission("can_edit", "Variables"))  # added by hand

    def move_billing_to_identity(data):
        for service in data["services"]:
            if service["team"] == "payments":
                service["team"] = "identity"

    changes = {change.role: change for change in sync_once(sm, access.roles_from_catalog(
        catalog(move_billing_to_identity)))}
    assert ("can_edit", "DAG:release_billing-service") in changes["identity-release"].add
    assert ("can_edit", "Variables") in changes["identity-release"].remove
    assert changes["payments-release"].retired and "no longer in the catalog" in changes["payments-release"].describe()
    held = access.database_roles(sm)
    assert held["payments-release"] == set()  # emptied, not deleted: its users are not dropped silently
    assert trigger(held["identity-release"], "release_billing-service")
    assert set(changes) == {"identity-release", "payments-release"}


def test_a_team_that_cannot_name_a_role_is_refused_naming_the_field():
    def bad_team(data):
        data["services"][1]["team"] = "Payments Team"
        data.pop("teams", None)

    with pytest.raises(access.AccessError, match=r"services\.yaml: field services\[1\] \(billing-service\)\.team"):
        access.roles_from_catalog(catalog(bad_team))
    assert access.is_managed_role("payments-release") and not access.is_managed_role("Admin")
    assert not access.is_managed_role("Viewer") and not access.is_managed_role("User")


@pytest.mark.parametrize(("conf", "forced"), [
    ({"window": "now", "force_reason": "outage", "environment": "production"}, True),
    ({"window": "2026-12-01T10:00:00+00:00", "force_reason": "x", "environment": "production"}, True),
    ({"window": "now", "force_reason": "outage", "environment": "staging"}, False),
    ({"window": "next", "environment": "production"}, False),
    ({"window": "now", "force_reason": "outage", "environment": "moon"}, True),  # unknown: counts as production
    ({"window": "now", "force_reason": "outage"}, False),  # the catalog's default environment is staging
])
def test_what_forces_a_production_window(conf, forced):
    assert (access.forced_in_production(conf, catalog()) is not None) is forced
    if conf.get("force_reason"):
        assert access.forced_in_production(conf, None) is not None  # no catalog: production


def test_may_force_window_asks_the_configured_auth_manager(monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", access.SIMPLE_AUTH_MANAGER)
    assert access.may_force_window("anyone") is True  # the local default: as before roles existed
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", FAB)
    roles = {"lea": {"release-manager", "viewer"}, "ops": {"Admin"}, "ida": {"identity-release", "viewer"}}
    monkeypatch.setattr(access, "fab_roles_of", roles.get)
    assert access.may_force_window("lea") is True and access.may_force_window("ops") is True
    refusal = access.may_force_window("ida")
    assert isinstance(refusal, str) and "ida holds identity-release, viewer, not release-manager" in refusal
    assert "not an active user" in str(access.may_force_window("gone"))
    assert "names no triggering user" in str(access.may_force_window(None))
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", "example.KeycloakAuthManager")
    assert "cannot tell who is one" in str(access.may_force_window("lea"))


def run_guard(monkeypatch, path, body, user="ida", verdict=True):
    seen = {}

    async def inner(scope, receive, send):
        seen["body"] = b""
        while True:
            message = await receive()
            seen["body"] += message["body"]
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def request_user(scope):
        seen["asked"] = True
        return SimpleNamespace(get_name=lambda: user)

    monkeypatch.setattr(access, "_request_user", request_user)
    monkeypatch.setattr(access, "may_force_window", lambda name: verdict)
    monkeypatch.setattr(access, "_load_catalog_or_none", catalog)
    sent = []
    chunks = [{"type": "http.request", "body": body[:10], "more_body": True},
              {"type": "http.request", "body": body[10:], "more_body": False}]

    async def receive():
        return chunks.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    asyncio.run(access.ForceWindowGuard(inner)(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"]), seen


def test_the_guard_refuses_a_forced_production_run_to_a_user_the_rule_refuses(monkeypatch):
    forced = json.dumps({"conf": {"image_tag": "1", "window": "now", "force_reason": "outage",
                                  "environment": "production"}}).encode()
    status, body, seen = run_guard(monkeypatch, "/api/v2/dags/release_auth-service/dagRuns", forced,
                                   verdict="only a release manager may force")
    assert status == 403 and body == {"detail": "only a release manager may force"} and "body" not in seen
    status, _, seen = run_guard(monkeypatch, "/api/v2/dags/release_auth-service/dagRuns", forced)
    assert status == 200 and seen["body"] == forced  # allowed: the API gets the whole body it was sent
    backfill = json.dumps({"dag_id": "release_auth-service", "dag_run_conf": json.loads(forced)["conf"]}).encode()
    assert run_guard(monkeypatch, "/api/v2/backfills", backfill, verdict="no")[0] == 403
    plain = json.dumps({"conf": {"image_tag": "1"}}).encode()
    status, _, seen = run_guard(monkeypatch, "/api/v2/dags/release_auth-service/dagRuns", plain, verdict="no")
    assert status == 200 and "asked" not in seen  # not forcing: nobody is asked anything


def test_omni_release_names_the_missing_permission_of_a_403():
    forbidden = httpx.Response(403, json={"detail": "Forbidden"})
    text = client.forbidden_message("POST", "/dags/release_billing-service/dagRuns", forbidden)
    assert "can_edit on DAG:release_billing-service and can_create on DAG Runs" in text and "(Forbidden)" not in text
    guard = httpx.Response(403, json={"detail": "only a release manager may force a maintenance window"})
    assert "(only a release manager may force" in client.forbidden_message("POST", "/dags/x/dagRuns", guard)


def test_the_roles_command_prints_the_catalogs_roles_and_a_broken_catalog_changes_nothing(monkeypatch, tmp_path,
                                                                                          capsys):
    import io

    out = io.StringIO()
    assert access.main(["roles"], out=out) == 0
    text = out.getvalue()
    assert "identity-release:\n" in text and "  can_edit on DAG:release_auth-service\n" in text
    data = yaml.safe_load(CATALOG.read_text())
    data["services"][1]["team"] = "Payments Team"
    data.pop("teams", None)
    broken = tmp_path / "services.yaml"
    broken.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("OMNISPHERE_CATALOG", str(broken))
    assert access.main(["sync"], out=io.StringIO()) == 2  # refused before any connection to the database
    error = capsys.readouterr().err
    assert f"{broken}: field services[1] (billing-service).team" in error and "nothing was changed" in error, error


def test_the_guard_knows_the_user_by_bearer_token_or_by_the_uis_cookie(monkeypatch):
    from airflow.api_fastapi import app

    class Manager:
        async def get_user_from_token(self, token):
            if token != "good":  # noqa: S105 - the fake manager's only valid token
                raise ValueError("bad token")
            return SimpleNamespace(get_name=lambda: "lea")

    monkeypatch.setattr(app, "get_auth_manager", Manager)

    def user(headers):
        scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
        return asyncio.run(access._request_user(scope))

    assert user([(b"authorization", b"Bearer good")]).get_name() == "lea"
    assert user([(b"cookie", b"_token=good")]).get_name() == "lea"
    assert user([(b"authorization", b"Bearer forged")]) is None  # the API refuses it on its own
    assert user([]) is None
