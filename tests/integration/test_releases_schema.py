"""The Releases page's schema history against real PostgreSQL: versions, the audit log newest first (who applied or
reverted what, and why), drift, and that reading changes nothing, not even on a database never migrated."""

from __future__ import annotations

from pathlib import Path

import psycopg2
import pytest

from omnisphere_release.migrations import EngineSettings, MigrationEngine
from omnisphere_release.ui.schema import schema_history

pytestmark = pytest.mark.integration


def engine(dsn: str, folder: Path, applied_by: str) -> MigrationEngine:
    return MigrationEngine("auth-service", folder, lambda: psycopg2.connect(dsn),
                           EngineSettings(lock_timeout_ms=200, statement_timeout_ms=5000, lock_retries=1),
                           applied_by=applied_by)


def tables(dsn: str) -> set[str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r[0] for r in cur.fetchall()}


def test_schema_history_tells_versions_audit_and_drift_and_writes_nothing(scratch_database, sql_dir):
    folder = sql_dir / "auth-service" / "migrations"
    reader = engine(scratch_database, folder, "releases page")
    connect = lambda: psycopg2.connect(scratch_database)  # noqa: E731

    empty = schema_history(reader, connect)
    assert (empty["current_version"], empty["applied"], empty["log"]) == ("none", [], [])
    assert len(empty["pending"]) == 4 and tables(scratch_database) == set()  # reading created no history table

    engine(scratch_database, folder, "dag=release_auth-service run=r1").migrate("up", reason="sign-in v2")
    engine(scratch_database, folder, "dag=rollback_auth-service run=r2").migrate("down", target=2,
                                                                                 reason="tokens broke logins")
    (folder / "001_create_users.up.sql").write_text("-- edited after it was applied\nSELECT 1;\n")
    before = tables(scratch_database)

    history = schema_history(reader, connect)
    assert history["current_version"] == "2"
    assert [(a["version"], a["applied_by"]) for a in history["applied"]] == [
        (1, "dag=release_auth-service run=r1"), (2, "dag=release_auth-service run=r1")]
    assert history["pending"] == ["003_create_api_tokens", "004_users_last_login"]
    assert [(e["version"], e["action"], e["by"], e["reason"]) for e in history["log"][:2]] == [
        (3, "reverted", "dag=rollback_auth-service run=r2", "tokens broke logins"),
        (4, "reverted", "dag=rollback_auth-service run=r2", "tokens broke logins")]
    assert {e["action"] for e in history["log"][2:]} == {"applied"} and len(history["log"]) == 6
    assert len(history["drift"]) == 1 and "001_create_users.up.sql" in history["drift"][0]
    assert history["dirty"] == [] and tables(scratch_database) == before
