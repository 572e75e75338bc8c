"""The FastAPI app the plugin mounts on Airflow's API server at ``/omnisphere``: the Releases page and its JSON.

    GET /omnisphere/releases                      the page (calendar and history), for the UI's "Releases" entry
    GET /omnisphere/api/calendar?weeks=4          the next windows of each service and of release_all, and what runs
    GET /omnisphere/api/releases?service=S&limit=N  the release history of one service (or of every service)
    GET /omnisphere/api/report?dag_id=D&run_id=R  a release's report, as its report task returned it
    GET /omnisphere/api/bake?dag_id=D&run_id=R    the bake the monitoring gate recorded in that report (or none)
    GET /omnisphere/api/bake.svg?dag_id=D&run_id=R&tz=Z  its chart: 5xx rate and p99 per minute against the thresholds
    GET /omnisphere/release?dag_id=D&run_id=R     one release: its history line, approval, bake chart and readings
    GET /omnisphere/api/overview                  one line per service: running now, last releases, next window
    GET /omnisphere/api/schema?service=S          a service's schema versions and migration audit log (its database)
    GET /omnisphere/schema?service=S              the same, as a page

Every route authenticates as Airflow's own API does (a JWT in the Authorization header, or the UI's ``_token``
cookie): no credential is 401, and a user sees only the services whose release DAG the auth manager lets them read
(release_all's windows and queue need read access to release_all). The app only reads; it changes nothing.

The plugin hands Airflow :class:`omnisphere_release.ui.mount.ReleasesApp`, which imports this module on the first
request; Airflow's API modules and the ORM queries are imported later still, by the routes that need them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session

from omnisphere_release.catalog import Catalog, CatalogError, load_catalog
from omnisphere_release.report import render_markdown
from omnisphere_release.ui.bake import NO_BAKE, BakeError, bake_summary, check_bake, render_chart, warm_up
from omnisphere_release.ui.calendar import RELEASE_ALL, build_calendar
from omnisphere_release.ui.history import RunRecord, release_entry, service_history
from omnisphere_release.ui.mount import MOUNT
from omnisphere_release.ui.overview import service_overview
from omnisphere_release.ui.page import render_page, render_release_page, render_schema_page

HISTORY_LIMIT = 10
_bearer = HTTPBearer(auto_error=False)


def release_dag_id(service: str) -> str:
    return f"release_{service}"


@dataclass(frozen=True)
class Viewer:
    """Who asks, and what they may read: the services whose release DAG, and whether release_all, they may GET."""

    user: Any
    services: set[str]
    release_all: bool


async def viewer(request: Request) -> Viewer:
    """Authenticate the request as Airflow's API does and ask the auth manager which release DAGs it may read."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.core_api.security import get_user

    # get_user's own dependencies (the bearer header), resolved here: its module is imported at the first request.
    user = await get_user(request, None, await _bearer(request))
    catalog = _catalog()
    wanted = {release_dag_id(name) for name in catalog.names} | {RELEASE_ALL}
    readable = get_auth_manager().filter_authorized_dag_ids(dag_ids=wanted, user=user, method="GET")
    return Viewer(user, {name for name in catalog.names if release_dag_id(name) in readable}, RELEASE_ALL in readable)


ViewerDep = Annotated[Viewer, Depends(viewer)]


def _session() -> Iterator[Session]:
    from airflow.utils.session import create_session

    with create_session() as session:  # read only: nothing is added, so the commit at the end writes nothing
        yield session


SessionDep = Annotated[Session, Depends(_session)]


def _catalog() -> Catalog:
    try:
        return load_catalog()
    except CatalogError as exc:
        raise HTTPException(status_code=500, detail=f"The service catalog cannot be read: {exc}") from None


def _bases(request: Request) -> tuple[str, str]:
    """Return (the path Airflow's UI is served under, this app's path): links work behind a base_url prefix too."""
    root = str(request.scope.get("root_path") or MOUNT).rstrip("/")
    return (root[: -len(MOUNT)] if root.endswith(MOUNT) else ""), root


def calendar_data(session: Session, who: Viewer, weeks: float) -> dict[str, Any]:
    from omnisphere_release.ui import metadata

    catalog = _catalog()
    dags = {release_dag_id(s): s for s in who.services}
    return build_calendar(catalog, now=datetime.now(timezone.utc), weeks=weeks, services=who.services,
                          show_release_all=who.release_all, waiting=metadata.waiting_releases(session, dags),
                          queue=metadata.release_queue(session) if who.release_all else {})


def history_data(session: Session, who: Viewer, services: list[str], limit: int, request: Request
                 ) -> dict[str, list[dict[str, Any]]]:
    from omnisphere_release.ui import metadata

    ui_base, api_base = _bases(request)
    runs = metadata.release_runs(session, [release_dag_id(s) for s in services], limit)
    return {s: service_history(runs.get(release_dag_id(s), []), ui_base, api_base) for s in services}


def _services_asked(who: Viewer, service: str | None) -> list[str]:
    if service is None:
        return [s for s in _catalog().names if s in who.services]
    if service not in _catalog().names:  # name only the services this user may see
        raise HTTPException(status_code=404, detail=f"query param service: unknown service {service!r}; yours: "
                                                    f"{', '.join(sorted(who.services)) or 'none'}")
    if service not in who.services:
        raise HTTPException(status_code=403, detail=f"You may not read DAG {release_dag_id(service)}")
    return [service]


app = FastAPI(title="OmniSphere releases", description=__doc__)


@app.get("/api/calendar")
def get_calendar(who: ViewerDep, session: SessionDep,
                 weeks: Annotated[float, Query(gt=0, le=26, description="how far ahead, in weeks")] = 4,
                 ) -> dict[str, Any]:
    return calendar_data(session, who, weeks)


@app.get("/api/releases")
def get_releases(who: ViewerDep, session: SessionDep, request: Request, service: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = HISTORY_LIMIT) -> dict[str, Any]:
    return {"releases": history_data(session, who, _services_asked(who, service), limit, request)}


def _readable_release(who: Viewer, dag_id: str) -> str:
    """Return the service of a release DAG the viewer may read; 403 otherwise (the one rule for a single run)."""
    services = {release_dag_id(s): s for s in who.services}
    if dag_id not in services:
        raise HTTPException(status_code=403, detail=f"You may not read DAG {dag_id}, or it is not a release DAG")
    return services[dag_id]


def _report(session: Session, who: Viewer, dag_id: str, run_id: str) -> dict[str, Any]:
    from omnisphere_release.ui import metadata

    _readable_release(who, dag_id)
    report = metadata.report_of(session, dag_id, run_id)
    if report is None:
        raise HTTPException(status_code=404, detail=f"{dag_id} run {run_id} has no release report (its report task "
                                                    "has not run)")
    return report


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise HTTPException(status_code=422, detail=f"query param tz: unknown time zone {tz!r}; give an IANA name "
                                                    "such as UTC or Europe/Paris") from None


@app.get("/api/report", response_model=None)
def get_report(who: ViewerDep, session: SessionDep, dag_id: str, run_id: str,
               as_format: Annotated[str, Query(alias="format", pattern="^(json|md)$")] = "json") -> dict[str, Any] | PlainTextResponse:
    report = _report(session, who, dag_id, run_id)
    return PlainTextResponse(render_markdown(report)) if as_format == "md" else report


def _run(session: Session, who: Viewer, dag_id: str, run_id: str) -> RunRecord:
    from omnisphere_release.ui import metadata

    _readable_release(who, dag_id)
    record = metadata.release_run(session, dag_id, run_id)
    if record is None:
        raise HTTPException(status_code=404, detail=f"{dag_id} has no run {run_id}")
    return record


@app.get("/api/bake")
def get_bake(who: ViewerDep, session: SessionDep, dag_id: str, run_id: str) -> dict[str, Any]:
    """The bake as the monitoring gate recorded it (``bake`` is null, with a note, when the run recorded none)."""
    record = _run(session, who, dag_id, run_id)
    bake = record.bake
    return {"dag_id": dag_id, "run_id": run_id, "service": _readable_release(who, dag_id),
            "outcome": (record.report or {}).get("outcome"), "bake": bake, "summary": bake_summary(bake),
            "note": None if bake else NO_BAKE}


@app.get("/api/bake.svg", response_class=Response)
def get_bake_chart(who: ViewerDep, session: SessionDep, dag_id: str, run_id: str, tz: str = "UTC") -> Response:
    zone = _zone(tz)
    service = _readable_release(who, dag_id)
    bake = _run(session, who, dag_id, run_id).bake
    if bake is None:
        raise HTTPException(status_code=404, detail=f"{dag_id} run {run_id}: {NO_BAKE} (the run did not reach the "
                                                    "monitoring gate, or its report predates bake recording)")
    try:
        svg = render_chart(bake, title=f"{service} {run_id}", tz=zone)
    except BakeError as exc:
        raise HTTPException(status_code=500, detail=f"{dag_id} run {run_id}: {exc}") from None
    # A report is written once: the browser may keep the chart (private: it is one user's view).
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "private, max-age=300"})


@app.get("/release", response_class=HTMLResponse)
def get_release_page(who: ViewerDep, session: SessionDep, request: Request, dag_id: str, run_id: str,
                     background: BackgroundTasks) -> HTMLResponse:
    background.add_task(warm_up)  # the page's chart is asked for next
    service = _readable_release(who, dag_id)
    record = _run(session, who, dag_id, run_id)
    ui_base, api_base = _bases(request)
    bake = record.bake
    problem = None
    try:
        if bake is not None:
            check_bake(bake)
    except BakeError as exc:
        problem = str(exc)
    return HTMLResponse(render_release_page(service, release_entry(record, ui_base, api_base), bake, problem))


def overview_data(session: Session, who: Viewer, request: Request, weeks: float
                  ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], dict[str, Any]]:
    calendar = calendar_data(session, who, weeks)
    history = history_data(session, who, _services_asked(who, None), HISTORY_LIMIT, request)
    return calendar, history, service_overview(calendar, history)


@app.get("/api/overview")
def get_overview(who: ViewerDep, session: SessionDep, request: Request,
                 weeks: Annotated[float, Query(gt=0, le=26)] = 4) -> dict[str, Any]:
    return overview_data(session, who, request, weeks)[2]


@app.get("/releases", response_class=HTMLResponse)
def get_page(who: ViewerDep, session: SessionDep, request: Request, background: BackgroundTasks,
             weeks: Annotated[float, Query(gt=0, le=26)] = 4) -> HTMLResponse:
    background.add_task(warm_up)  # after the answer: a chart opened from the history is then drawn at once
    return HTMLResponse(render_page(*overview_data(session, who, request, weeks)))


def schema_data(service: str) -> dict[str, Any]:
    """Read the schema history from the service's own database, through its Airflow connection."""
    import logging

    from omnisphere_release.hooks.postgres import ServiceDatabaseHook, schema_engine
    from omnisphere_release.ui.schema import schema_history

    catalog = _catalog()
    record = catalog.get(service)
    try:
        engine = schema_engine(record, catalog, "releases page", logging.getLogger(__name__))
        return schema_history(engine, ServiceDatabaseHook(record.postgres_conn_id).get_conn)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same answer: the database could not be read
        raise HTTPException(status_code=502, detail=f"Could not read the schema history of {service} through "
                                                    f"connection {record.postgres_conn_id!r}: {type(exc).__name__}: "
                                                    f"{exc}") from None


@app.get("/api/schema")
def get_schema(who: ViewerDep, service: str) -> dict[str, Any]:
    return schema_data(_services_asked(who, service)[0])


@app.get("/schema", response_class=HTMLResponse)
def get_schema_page(who: ViewerDep, service: str) -> HTMLResponse:
    return HTMLResponse(render_schema_page(schema_data(_services_asked(who, service)[0])))
