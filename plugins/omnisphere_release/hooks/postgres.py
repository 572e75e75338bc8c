"""Connect to a service database named by an Airflow connection."""

from __future__ import annotations

from typing import Any

import psycopg2
from airflow.sdk import BaseHook

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
