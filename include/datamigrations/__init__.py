"""Python data migrations: functions that data migration specs name as ``python: datamigrations.<module>:<function>``.

The engine puts this folder's parent (include/, the folder that holds sql/) on sys.path, so these modules import the
same way in an Airflow worker, the CLI and the tests. Each function does one batch, ``function(conn, last_key,
upper_key) -> rows changed``, in the engine's transaction: it must not commit. See omnisphere_release.datamigrate.
"""
