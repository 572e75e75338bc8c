"""Register the OmniSphere release orchestrator with Airflow (the package itself is plugins/omnisphere_release):
the maintenance-window timetable, the Releases page (a FastAPI app on the API server and its navigation entry), and
the API's guard on forcing a production window."""

from airflow.plugins_manager import AirflowPlugin

from omnisphere_release.access import ForceWindowGuard
from omnisphere_release.timetables import MaintenanceWindowTimetable
from omnisphere_release.ui.mount import MOUNT, ReleasesApp


class OmniSpherePlugin(AirflowPlugin):
    name = "omnisphere_release"
    timetables = [MaintenanceWindowTimetable]
    # Imported on its first request: every process loads this plugin, only the API server serves the page.
    fastapi_apps = [{"app": ReleasesApp(), "url_prefix": MOUNT, "name": "OmniSphere releases"}]
    # url_route: the UI shows the page in its frame at /plugin/releases, with the navigation around it;
    # nav_top_level: a button of its own in the navigation bar, not an item of the Plugins menu.
    external_views = [{"name": "Releases", "href": f"{MOUNT}/releases", "destination": "nav", "url_route": "releases",
                       "nav_top_level": True}]
    # Only a release manager may force a production maintenance window: refused at the API before the run exists
    # (Airflow 3 tasks cannot read users and roles). See omnisphere_release.access.
    fastapi_root_middlewares = [{"middleware": ForceWindowGuard, "args": [], "kwargs": {},
                                 "name": "OmniSphere force-window guard"}]
