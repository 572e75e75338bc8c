"""Register the OmniSphere release orchestrator with Airflow (the package itself is plugins/omnisphere_release)."""

from airflow.plugins_manager import AirflowPlugin

from omnisphere_release.timetables import MaintenanceWindowTimetable


class OmniSpherePlugin(AirflowPlugin):
    name = "omnisphere_release"
    timetables = [MaintenanceWindowTimetable]
