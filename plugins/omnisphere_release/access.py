"""Who may do what, from the catalog: roles and permissions for Airflow's FAB auth manager, and the force-window rule.

Three kinds of roles, computed from include/services.yaml (each service's ``team``):

    <team>-release    triggers and clears release_<service> and rollback_<service> of its team's services only, and
                      reads those DAGs, their runs, task logs and reports
    release-manager   reads every DAG; triggers and clears every release_ and rollback_ DAG, release_all and
                      queue_release; approves (human-in-the-loop responses); may force a maintenance window in
                      production (``may_force_window``)
    viewer            reads every DAG, its runs, task logs and reports; changes nothing

``python -m omnisphere_release.access sync`` makes the metadata database say exactly that: it creates the roles,
adds the permissions they lack and removes the ones they hold beyond the catalog (a service that moved to another
team, a team that left the catalog: its role is emptied, not deleted, so that its users are not dropped silently).
Running it twice changes nothing the second time, and says so. Only the roles named above are touched: Admin, Op,
User, Viewer, Public and any role made by hand keep what they have.

Permissions are named as the FAB auth manager names them: an action (can_read, can_edit, can_create, menu_access)
on a resource (``DAGs``, ``DAG Runs``...), where ``DAG:<dag_id>`` is one DAG. Triggering a DAG needs can_create on
``DAG Runs`` and can_edit on the DAG, clearing it can_edit on ``DAG Runs`` and ``Task Instances`` and on the DAG
(airflow/providers/fab/auth_manager/fab_auth_manager.py, is_authorized_dag): the DAG-level grant is what confines a
team to its own services. The names are written here rather than imported, so that this module and its tests need
neither Airflow nor the provider; tests/unit/test_access.py checks them against the provider's constants.

The force-window rule: in a production environment, a release that starts outside its maintenance window
(``window=now``, or a time outside the windows, both with ``force_reason``) is a release manager's decision.
``ForceWindowGuard`` (a middleware of the API server, registered by the plugin) refuses such a run, with a 403
that names the missing role, before it exists. The check is made there, and not in the run's tasks, because
Airflow 3 gives task processes no access to the metadata database where users and roles live.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from omnisphere_release.catalog import Catalog

log = logging.getLogger(__name__)

VIEWER, RELEASE_MANAGER = "viewer", "release-manager"
TEAM_ROLE_SUFFIX = "-release"
# Roles named <team>-release belong to this sync: a role made by hand must not end with -release.
TEAM_ROLE = re.compile(r"^[a-z0-9][a-z0-9-]*" + re.escape(TEAM_ROLE_SUFFIX) + "$")
TEAM_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,48}$")
# Who passes the force-window rule: the release managers, and Admin (who could grant itself the role anyway).
MAY_FORCE_ROLES = (RELEASE_MANAGER, "Admin")
# The DAGs of one service that its team releases and rolls back (DAG ids as dags/__init__.py builds them).
SERVICE_DAG_PREFIXES = ("release_", "rollback_")
# The DAGs of the whole train: only release managers run them.
TRAIN_DAGS = ("release_all", "queue_release")

# The FAB auth manager's names (airflow/providers/fab/www/security/permissions.py).
CAN_READ, CAN_EDIT, CAN_CREATE, MENU = "can_read", "can_edit", "can_create", "menu_access"
DAGS, DAG_PREFIX, DAG_RUNS, TASK_INSTANCES = "DAGs", "DAG:", "DAG Runs", "Task Instances"
HITL_DETAIL = "HITL Detail"

Permission = tuple[str, str]  # (action, resource)

# What every role needs to use the UI and read what it may see of a DAG: its runs, task instances, logs, XComs (the
# release report), code, versions, warnings and pending approvals. FAB grants these sub-entities only on the DAGs the
# role may read (can_read on DAGs, or on DAG:<dag_id>).
DAG_DETAIL_READS: frozenset[Permission] = frozenset(
    (CAN_READ, resource) for resource in (DAG_RUNS, TASK_INSTANCES, "Task Logs", "XComs", "DAG Code",
                                          "DAG Dependencies", "DAG Versions", "DAG Warnings", HITL_DETAIL))
# (can_read on Plugins: the UI learns of the Releases page from GET /api/v2/plugins; without it, no button.)
UI: frozenset[Permission] = frozenset({
    (CAN_READ, "Website"), (CAN_READ, "My Profile"), (CAN_EDIT, "My Profile"), (CAN_READ, "My Password"),
    (CAN_EDIT, "My Password"), (MENU, "Browse"), (MENU, DAGS), (MENU, DAG_RUNS), (MENU, TASK_INSTANCES),
    (MENU, "Docs"), (MENU, "Documentation"), (CAN_READ, "Plugins"),
})
# Trigger (can_create on DAG Runs) and clear (can_edit on DAG Runs and Task Instances), on the DAGs the role may
# edit: FAB asks for can_edit on the DAG (DAGs, or DAG:<dag_id>) before any change to its runs.
RUN_CHANGES: frozenset[Permission] = frozenset({(CAN_CREATE, DAG_RUNS), (CAN_EDIT, DAG_RUNS),
                                                (CAN_EDIT, TASK_INSTANCES)})


class AccessError(ValueError):
    """The catalog cannot be turned into roles: the message names the file and field, and what to change."""


def dag_resource(dag_id: str) -> str:
    return DAG_PREFIX + dag_id


def team_role(team: str) -> str:
    return team + TEAM_ROLE_SUFFIX


def service_dags(service: str) -> list[str]:
    return [prefix + service for prefix in SERVICE_DAG_PREFIXES]


def is_managed_role(name: str) -> bool:
    """Tell whether ``sync`` owns the role ``name`` (it never touches any other)."""
    return name in (VIEWER, RELEASE_MANAGER) or bool(TEAM_ROLE.match(name))


def roles_from_catalog(catalog: Catalog) -> dict[str, frozenset[Permission]]:
    """Return each role this catalog calls for, with the exact set of permissions it holds."""
    teams: dict[str, list[str]] = {}
    for index, service in enumerate(catalog.services):
        if not service.team:
            continue
        if not TEAM_NAME.match(service.team):
            raise AccessError(f"{catalog.path}: field services[{index}] ({service.name}).team: {service.team!r} "
                              "cannot name a role (<team>-release): use lower-case letters, digits and '-', "
                              "at most 49 characters")
        teams.setdefault(service.team, []).append(service.name)
    roles = {
        VIEWER: UI | DAG_DETAIL_READS | {(CAN_READ, DAGS), (CAN_READ, "Cluster Activity"), (CAN_READ, "ImportError")},
        RELEASE_MANAGER: UI | DAG_DETAIL_READS | RUN_CHANGES | {(CAN_READ, DAGS), (CAN_READ, "Cluster Activity"),
                                                                (CAN_READ, "ImportError"), (CAN_EDIT, HITL_DETAIL),
                                                                (MENU, HITL_DETAIL)}
        | {(CAN_EDIT, dag_resource(dag_id)) for dag_id in TRAIN_DAGS}
        | {(CAN_EDIT, dag_resource(dag_id)) for service in catalog.services for dag_id in service_dags(service.name)},
    }
    for team, services in teams.items():
        dags = [dag_id for name in services for dag_id in service_dags(name)]
        roles[team_role(team)] = (UI | DAG_DETAIL_READS | RUN_CHANGES
                                  | {(action, dag_resource(dag_id)) for dag_id in dags for action in (CAN_READ, CAN_EDIT)})
    return {name: frozenset(permissions) for name, permissions in roles.items()}


def services_without_team(catalog: Catalog) -> list[str]:
    return [service.name for service in catalog.services if not service.team]


# ---- sync: the difference between what the catalog calls for and what the database holds ---------------------------
@dataclass
class RoleChange:
    role: str
    create: bool = False
    add: set[Permission] = field(default_factory=set)
    remove: set[Permission] = field(default_factory=set)
    retired: bool = False  # a team role whose team left the catalog: emptied

    def __bool__(self) -> bool:
        return self.create or bool(self.add) or bool(self.remove)

    def describe(self) -> str:
        what = ["created"] if self.create else []
        if self.add:
            what.append(f"+{len(self.add)} ({_short(self.add)})")
        if self.remove:
            what.append(f"-{len(self.remove)} ({_short(self.remove)})")
        note = (": its team is no longer in the catalog; its users keep the role, which grants nothing now "
                f"(delete it with `airflow roles delete {self.role}` once they have another)") if self.retired else ""
        return f"role {self.role}: {', '.join(what)}{note}"


def _short(permissions: Iterable[Permission], limit: int = 4) -> str:
    names = sorted(f"{action} on {resource}" for action, resource in permissions)
    return "; ".join(names[:limit]) + (f"; and {len(names) - limit} more" if len(names) > limit else "")


def plan_sync(wanted: Mapping[str, frozenset[Permission]],
              current: Mapping[str, set[Permission]]) -> list[RoleChange]:
    """Return what to change so that the managed roles of ``current`` (role -> permissions, every role of the
    database) become ``wanted``; roles that ``is_managed_role`` does not claim are left out."""
    changes = []
    for role, permissions in sorted(wanted.items()):
        held = current.get(role)
        changes.append(RoleChange(role, create=held is None, add=set(permissions - (held or set())),
                                  remove=set((held or set()) - permissions)))
    for role, held in sorted(current.items()):
        if role not in wanted and is_managed_role(role):
            changes.append(RoleChange(role, remove=set(held), retired=True))
    return [change for change in changes if change]


def apply_sync(changes: list[RoleChange], security_manager: Any) -> None:
    """Apply ``changes`` through FAB's security manager (each call commits on its own)."""
    sm = security_manager
    for change in changes:
        role = sm.find_role(change.role) or sm.add_role(change.role)
        for action, resource in sorted(change.add):
            sm.add_permission_to_role(role, sm.create_permission(action, resource))  # creates what is missing
        for action, resource in sorted(change.remove):
            permission = sm.get_permission(action, resource)
            if permission is not None:
                sm.remove_permission_from_role(role, permission)


def database_roles(security_manager: Any) -> dict[str, set[Permission]]:
    return {role.name: {(p.action.name, p.resource.name) for p in role.permissions if p.action and p.resource}
            for role in security_manager.get_all_roles()}


def sync(catalog: Catalog, check_only: bool = False, out: Any = None) -> list[RoleChange]:
    """Make the managed roles of Airflow's metadata database match ``catalog``; return what changed (or, with
    ``check_only``, what would change)."""
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    out = out or sys.stdout
    wanted = roles_from_catalog(catalog)
    started = time.monotonic()
    # FAB logs each permission it adds at INFO, and this sync prints the same changes in one line per role.
    logging.getLogger("airflow.providers.fab.auth_manager.security_manager.override").setLevel(logging.WARNING)
    with get_application_builder() as appbuilder:
        changes = plan_sync(wanted, database_roles(appbuilder.sm))
        if not check_only:
            apply_sync(changes, appbuilder.sm)
            remaining = plan_sync(wanted, database_roles(appbuilder.sm))
            if remaining:
                raise RuntimeError("the roles still differ from the catalog after the sync: "
                                   + "; ".join(change.describe() for change in remaining))
    for change in changes:
        print(("would change " if check_only else "") + change.describe(), file=out)
    for name in services_without_team(catalog):
        print(f"note: {name} has no team in {catalog.path}: only release-manager may release or roll it back",
              file=out)
    verb = "would change" if check_only else "changed"
    print(f"{len(wanted)} roles from {catalog.path} ({', '.join(sorted(wanted))}): "
          + (f"{verb} {len(changes)} in {time.monotonic() - started:.1f}s" if changes
             else "nothing to change, the database matches the catalog"), file=out)
    return changes


# ---- the force-window rule ------------------------------------------------------------------------------------------
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


def may_force_window(username: str | None) -> Literal[True] | str:
    """Return True when ``username`` may force a production release outside its maintenance window, else the reason.

    Asks the configured auth manager: with the FAB auth manager, the user must be active and hold release-manager
    (or Admin); with the simple auth manager (local development: every user is an admin there) anyone may, as
    before roles existed; any other auth manager is refused, since this module cannot read its roles. Needs the
    metadata database: call it in the API server (``ForceWindowGuard``), the scheduler or the CLI, not in a task.
    """
    from airflow.configuration import conf

    manager = conf.get("core", "auth_manager")
    if manager == SIMPLE_AUTH_MANAGER:
        return True
    try:
        from airflow.providers.fab.auth_manager.fab_auth_manager import FabAuthManager

        module, _, name = manager.rpartition(".")
        is_fab = issubclass(getattr(importlib.import_module(module), name), FabAuthManager)
    except (ImportError, AttributeError, TypeError):
        is_fab = False
    if not is_fab:
        return (f"only a release manager may force a maintenance window, and the auth manager {manager} cannot "
                "tell who is one (supported: the FAB auth manager)")
    if not username:
        return "only a release manager may force a maintenance window, and the run names no triggering user"
    roles = fab_roles_of(username)
    if roles is None:
        return f"only a release manager may force a maintenance window: {username!r} is not an active user"
    if set(MAY_FORCE_ROLES) & roles:
        return True
    return (f"only a release manager may force a maintenance window in production (window=now, or a time outside "
            f"the service's windows, with force_reason): {username} holds {', '.join(sorted(roles)) or 'no role'}, "
            f"not {RELEASE_MANAGER}; trigger it for the next window (window=next), or ask a release manager")


def fab_roles_of(username: str) -> set[str] | None:
    """Return the role names of an active FAB user, or None when there is no such active user."""
    from airflow.providers.fab.auth_manager.models import User
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        user = session.scalars(select(User).where(User.username == username)).one_or_none()
        if user is None or not user.is_active:
            return None
        return {role.name for role in user.roles}


def forced_in_production(conf: Mapping[str, Any], catalog: Catalog | None) -> str | None:
    """Describe how run ``conf`` forces a production maintenance window, or return None when it does not.

    Forcing takes a ``force_reason`` (``window=now`` or a time outside the windows is refused without one), so a
    run conf with a force_reason, or window=now, in a production environment is a forcing one. The environment is
    the conf's ``environment`` or the catalog's default; an unknown one, or no catalog, counts as production.
    """
    window = str(conf.get("window") or "")
    reason = str(conf.get("force_reason") or "").strip()
    if window != "now" and not reason:
        return None
    environment = str(conf.get("environment") or "")
    if catalog is not None:
        try:
            if not catalog.environment(environment or None).production:
                return None
        except ValueError:  # CatalogError: an unknown environment, refused later by the run itself
            pass
    return f"window={window or 'next'} with force_reason in {environment or 'the default environment'}"


def _load_catalog_or_none() -> Catalog | None:
    from omnisphere_release.catalog import load_catalog

    try:
        return load_catalog()
    except (OSError, ValueError) as exc:
        log.warning("Cannot read the catalog (%s): every forcing run counts as production", exc)
        return None


# Where runs are created through the public API: a DAG's trigger, and a backfill (its dag_run_conf).
TRIGGER_PATH = re.compile(r"^/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/?$")
BACKFILL_PATH = re.compile(r"^/api/v2/backfills(/dry_run)?/?$")
MAX_BODY = 1024 * 1024


class ForceWindowGuard:
    """An ASGI middleware for the API server: refuse (403) to create a run that forces a production maintenance
    window unless ``may_force_window`` lets its user. Every other request goes through untouched; a request this
    guard cannot attribute to a user (no or a bad token) goes on to the API, which refuses it (401)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope.get("type") != "http" or scope.get("method") != "POST" or not (
                TRIGGER_PATH.match(path) or BACKFILL_PATH.match(path)):
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body") or len(body) > MAX_BODY:
                break

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        refusal = await self._refusal(scope, body, path)
        if refusal is None:
            await self.app(scope, replay, send)
            return
        payload = json.dumps({"detail": refusal}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def _refusal(self, scope: dict[str, Any], body: bytes, path: str) -> str | None:
        from starlette.concurrency import run_in_threadpool

        try:
            document = json.loads(body or b"{}")
        except ValueError:
            return None  # the API answers a malformed body itself (422)
        if not isinstance(document, dict):
            return None
        conf = document.get("dag_run_conf" if BACKFILL_PATH.match(path) else "conf") or {}
        if not isinstance(conf, dict):
            return None
        catalog = await run_in_threadpool(_load_catalog_or_none)
        forcing = forced_in_production(conf, catalog)
        if forcing is None:
            return None
        user = await _request_user(scope)
        if user is None:
            return None
        verdict = await run_in_threadpool(may_force_window, user.get_name())
        if verdict is True:
            log.info("%s forces a maintenance window (%s) on %s: allowed", user.get_name(), forcing, path)
            return None
        log.warning("Refused %s on %s (%s): %s", user.get_name(), path, forcing, verdict)
        return str(verdict)


async def _request_user(scope: dict[str, Any]) -> Any:
    """The user of a request, from its bearer token or the UI's token cookie, as the API authenticates it."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from starlette.requests import Request

    request = Request(scope)
    header = request.headers.get("authorization", "")
    token = (header[7:].strip() if header.lower().startswith("bearer ")
             else request.cookies.get(COOKIE_NAME_JWT_TOKEN))  # the UI's
    if not token:
        return None
    try:
        return await get_auth_manager().get_user_from_token(token)
    except Exception:  # noqa: BLE001 - an expired or forged token: the API refuses it on its own (401/403)
        return None


# ---- the first administrator ----------------------------------------------------------------------------------------
ADMIN_USERNAME_VARIABLE, ADMIN_PASSWORD_VARIABLE = "AIRFLOW_ADMIN_USERNAME", "AIRFLOW_ADMIN_PASSWORD"


def ensure_admin(environ: Mapping[str, str], reset_password: bool = False, out: Any = None) -> str:
    """Create the Admin user named by AIRFLOW_ADMIN_USERNAME (default ``admin``) with the password in
    AIRFLOW_ADMIN_PASSWORD, unless it exists; return what was done. The password comes from the environment, never
    the command line (``airflow users create --password`` would show it in ``ps``); an existing user keeps its
    password unless ``reset_password``."""
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    username = environ.get(ADMIN_USERNAME_VARIABLE) or "admin"
    password = environ.get(ADMIN_PASSWORD_VARIABLE) or ""
    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        user = sm.find_user(username=username)
        if (user is None or reset_password) and len(password) < 12:
            raise AccessError(f"set {ADMIN_PASSWORD_VARIABLE} (at least 12 characters) to "
                              f"{'create' if user is None else 'reset the password of'} the Admin user "
                              f"{username!r}; nothing was changed")
        if user is None:
            sm.add_user(username, username, "(admin)", f"{username}@localhost", sm.find_role("Admin"), password)
            done = f"created the Admin user {username!r} (password from {ADMIN_PASSWORD_VARIABLE})"
        elif reset_password:
            sm.reset_password(user.id, password)
            done = f"reset the password of {username!r} from {ADMIN_PASSWORD_VARIABLE}"
        else:
            done = f"the user {username!r} exists: left as it is (--reset-password sets {ADMIN_PASSWORD_VARIABLE})"
    print(done, file=out or sys.stdout)
    return done


# ---- the command line -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None, out: Any = None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m omnisphere_release.access", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sync_parser = commands.add_parser("sync", help="make the roles of the metadata database match the catalog")
    sync_parser.add_argument("--check", action="store_true",
                             help="change nothing; exit 1 when the database differs from the catalog")
    commands.add_parser("roles", help="print each role and its permissions, as computed from the catalog")
    may_force = commands.add_parser("may-force", help="tell whether a user may force a maintenance window")
    may_force.add_argument("username")
    admin = commands.add_parser("admin", help=f"create the first Admin user from ${ADMIN_USERNAME_VARIABLE} and "
                                              f"${ADMIN_PASSWORD_VARIABLE}, unless it exists")
    admin.add_argument("--reset-password", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "admin":
        try:
            ensure_admin(os.environ, args.reset_password, out)
        except AccessError as exc:
            print(f"access: {exc}", file=sys.stderr)
            return 2
        return 0

    from omnisphere_release.catalog import load_catalog

    try:
        catalog = load_catalog()
        if args.command == "roles":
            for role, permissions in sorted(roles_from_catalog(catalog).items()):
                print(f"{role}:", file=out)
                for action, resource in sorted(permissions, key=lambda p: (p[1], p[0])):
                    print(f"  {action} on {resource}", file=out)
            return 0
        if args.command == "may-force":
            verdict = may_force_window(args.username)
            print("yes" if verdict is True else f"no: {verdict}", file=out)
            return 0 if verdict is True else 1
        changes = sync(catalog, check_only=args.check, out=out)
        return 1 if args.check and changes else 0
    except ValueError as exc:  # CatalogError, AccessError: nothing was changed
        print(f"access: {exc}; nothing was changed", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
