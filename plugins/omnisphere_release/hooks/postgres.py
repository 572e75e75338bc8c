"""Connect to a service database named by an Airflow connection, and the engines bound to it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg2
from airflow.sdk import BaseHook
from psycopg2 import sql

from omnisphere_release.datamigrate import DataMigrationEngine, DataMigrationSpec
from omnisphere_release.logs import Log
from omnisphere_release.migrations import EngineSettings, MigrationEngine

if TYPE_CHECKING:
    from omnisphere_release.catalog import Catalog, Service

# Connection extras passed through to libpq; anything else in extras is ignored.
LIBPQ_EXTRAS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "target_session_attrs", "options")


class ServiceDatabaseHook(BaseHook):
    """Open psycopg2 connections to the database of one service.

    The engines are written against psycopg2 (its error classes and ``psycopg2.sql``), so this hook pins the driver
    instead of PostgresHook, which switches to psycopg 3 whenever that package is installed.
    """

    conn_name_attr = "postgres_conn_id"
    hook_name = "OmniSphere service database"

    def __init__(self, postgres_conn_id: str) -> None:
        super().__init__()
        self.postgres_conn_id = postgres_conn_id

    def connect_kwargs(self) -> dict[str, Any]:
        conn = self.get_connection(self.postgres_conn_id)
        kwargs: dict[str, Any] = {
            "host": conn.host or "localhost",
            "port": int(conn.port or 5432),
            "user": conn.login,
            "password": conn.password,
            "dbname": conn.schema,
            "connect_timeout": 10,
        }
        extras = conn.extra_dejson
        kwargs.update({key: extras[key] for key in LIBPQ_EXTRAS if key in extras})
        return kwargs

    def get_conn(self) -> Any:
        return psycopg2.connect(**self.connect_kwargs())

    def describe(self) -> str:
        """Return ``user@host:port/db`` for log lines (never the password)."""
        kw = self.connect_kwargs()
        return f"{kw['user']}@{kw['host']}:{kw['port']}/{kw['dbname']}"

    def count_rows(self, tables: list[str]) -> dict[str, int]:
        """Return the row count of each table that exists (a table the release itself creates is left out)."""
        counts: dict[str, int] = {}
        conn = self.get_conn()
        try:
            with conn, conn.cursor() as cur:
                for table in tables:
                    cur.execute("SELECT to_regclass(%s) IS NOT NULL", [table])
                    if not cur.fetchone()[0]:
                        continue
                    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*table.split(".", 1))))
                    counts[table] = cur.fetchone()[0]
        finally:
            conn.close()
        return counts

    def first_rows(self, conn: Any, query: str, limit: int) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run ``query`` (a check file's SQL, trusted like a migration) in its own transaction on ``conn``; return
        its column names and at most ``limit`` rows. Raises psycopg2.Error when it cannot run."""
        with conn, conn.cursor() as cur:
            cur.execute(query)
            rows = cur.fetchmany(limit)
            return [c.name for c in cur.description or []], rows


def schema_engine(service: Service, catalog: Catalog, applied_by: str, log: Log) -> MigrationEngine:
    """Return the schema migration engine of ``service``, on its database, with the catalog's lock settings."""
    return MigrationEngine(service.name, catalog.migrations_dir(service.name),
                           ServiceDatabaseHook(service.postgres_conn_id).get_conn,
                           EngineSettings.from_catalog(service.migrations), applied_by=applied_by, log=log)


def data_engine(service: Service, spec: DataMigrationSpec, run_by: str, log: Log) -> DataMigrationEngine:
    """Return the data migration engine of one spec of ``service``, on its database."""
    return DataMigrationEngine(spec, ServiceDatabaseHook(service.postgres_conn_id).get_conn, run_by=run_by, log=log)
