"""A service's schema history: the versions its database records (applied, dirty, drifted, pending) and the audit log
of what was applied or reverted, when, by which run and why. No Airflow here: the caller hands over a connection
factory (the service's Airflow connection on the API server) and the migration engine reads the history; this module
adds the audit log, newest first.

Read only: the engine's status (SELECTs) and the log read in a read-only session; never the engine's lock or DDL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg2 import sql

from omnisphere_release.migrations.engine import LOG_TABLE, MigrationEngine, version_label

AUDIT_LIMIT = 50


def read_audit_log(connect: Callable[[], Any], limit: int = AUDIT_LIMIT) -> list[dict[str, Any]]:
    """Return the newest ``limit`` entries of the service's migration audit log (none before its first migration)."""
    conn = connect()
    try:
        conn.set_session(readonly=True)
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", [LOG_TABLE])
            if not cur.fetchone()[0]:
                return []
            cur.execute(sql.SQL("SELECT at, version, name, action, by, reason, execution_ms FROM {} "
                                "ORDER BY at DESC, id DESC LIMIT %s").format(sql.Identifier(LOG_TABLE)), [limit])
            return [{"at": at.isoformat(), "version": version, "name": name, "action": action, "by": by,
                     "reason": reason or "", "execution_ms": ms} for at, version, name, action, by, reason, ms
                    in cur.fetchall()]
    finally:
        conn.close()


def schema_history(engine: MigrationEngine, connect: Callable[[], Any], limit: int = AUDIT_LIMIT) -> dict[str, Any]:
    """Return the schema's state (current version, applied, dirty, drift, pending) and its audit log."""
    status = engine.status()
    return {
        "service": status.service,
        "current_version": version_label(status.current_version),
        "baseline": status.baseline,
        "applied": [{"version": a.version, "name": a.name, "applied_at": a.applied_at.isoformat()
                     if hasattr(a.applied_at, "isoformat") else str(a.applied_at), "applied_by": a.applied_by}
                    for a in status.applied],
        "dirty": [{"version": d.version, "name": d.name, "direction": d.dirty_direction, "error": d.error or "",
                   "applied_by": d.applied_by} for d in status.dirty],
        "drift": status.drifted,
        "pending": [m.label for m in status.pending],
        "log": read_audit_log(connect, limit),
    }
