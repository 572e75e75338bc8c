"""Where the Releases app is mounted, and the app as the plugin hands it to Airflow: imported on its first request.

Every Airflow process loads the plugin (for its timetable), each task's process too, and only the API server serves
the page: the others need not import FastAPI's app, the ORM queries and the engines (about 0.2 s per process).
"""

from __future__ import annotations

from typing import Any

MOUNT = "/omnisphere"


class ReleasesApp:
    """An ASGI app that imports :mod:`omnisphere_release.ui.app` when its first request (or lifespan event) comes."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            from omnisphere_release.ui.app import app

            self._app = app
        await self._app(scope, receive, send)
