"""integrity_check: the service's SQL checks, and row counts against the "before" state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg2
from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from omnisphere_release.catalog import load_catalog
from omnisphere_release.contracts import ReleaseRun
from omnisphere_release.hooks.postgres import ServiceDatabaseHook
from omnisphere_release.operators.common import ServiceStageOperator
from omnisphere_release.transient import DatabaseUnreachable, connection_lost, retry_lost_connection

SHOWN_ROWS = 10


def check_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.sql")) if folder.is_dir() else []


class PostgresIntegrityCheckOperator(ServiceStageOperator):
    """Run every ``checks/*.sql`` of the service (a check passes when it returns no row), then compare the row counts
    of the tables the migrations touched with those preflight recorded.

    Like common-sql's SQLCheckOperator, a failure carries its evidence: which check, its query and the rows. It does
    not retry a failed check: a violated invariant will not heal by running the query again. A lost connection is
    another matter: it says nothing about the data, so the checks run again once the database answers (bounded).
    """

    def execute(self, context: Context) -> dict[str, Any]:
        catalog = load_catalog()
        service = catalog.get(self.service, self.environment)
        plan = ReleaseRun(context).plan
        counts_before = plan["row_counts"] if plan else {}
        files = check_files(catalog.checks_dir(service.name))
        self.log.info("Checking %s: %d SQL check(s) from %s, then row counts of %d table(s).", service.name,
                      len(files), catalog.checks_dir(service.name), len(counts_before))
        database = ServiceDatabaseHook(service.postgres_conn_id)

        def run_checks() -> tuple[list[dict[str, Any]], list[str], dict[str, int]]:
            results: list[dict[str, Any]] = []
            failures: list[str] = []
            conn = database.get_conn()
            try:
                for path in files:
                    query = path.read_text(encoding="utf-8")
                    try:
                        columns, rows = database.first_rows(conn, query, SHOWN_ROWS + 1)
                    except psycopg2.Error as exc:
                        if connection_lost(exc):
                            raise  # says nothing about the data: every check runs again on a new connection
                        failures.append(f"check {path.stem} ({path}) could not run: {str(exc).strip()}\n"
                                        f"    query: {' '.join(query.split())}")
                        continue
                    results.append({"check": path.stem, "rows": len(rows)})
                    if rows:
                        shown = [dict(zip(columns, row, strict=True)) for row in rows[:SHOWN_ROWS]]
                        more = " (and more)" if len(rows) > SHOWN_ROWS else ""
                        failures.append(f"check {path.stem} ({path}) returned {len(rows[:SHOWN_ROWS])} row(s)"
                                        f"{more}:\n    query: {' '.join(query.split())}\n    rows: {shown}")
                    else:
                        self.log.info("Check %s passed (no violating row).", path.stem)
            finally:
                conn.close()
            return results, failures, database.count_rows(list(counts_before))

        try:
            # The checks only read: after a lost connection (a database restart) they all run again.
            results, failures, counts_after = retry_lost_connection(
                run_checks, f"integrity checks of {service.name}", self.log)
        except DatabaseUnreachable as exc:
            raise AirflowException(f"{exc}. Nothing was checked to the end, and nothing changed.") from None
        tolerance = service.integrity.max_row_loss
        counts = []
        for table, was in counts_before.items():
            now = counts_after.get(table)
            counts.append({"table": table, "before": was, "after": now})
            if now is None:
                failures.append(f"table {table} had {was} rows before the release and no longer exists")
            elif was and (was - now) / was > tolerance:
                failures.append(f"table {table} lost {was - now} of {was} rows ({(was - now) / was:.1%}), more than "
                                f"the {tolerance:.1%} the catalog allows (integrity.max_row_loss)")
            else:
                self.log.info("Row count of %s: %s before, %s after (within %.1f%%).", table, was, now,
                              tolerance * 100)
        if failures:
            raise AirflowFailException(f"Integrity check of {service.name} failed; the release rolls back:\n"
                                       + "\n".join(f"  - {f}" for f in failures))
        self.log.info("Integrity of %s holds: %d check(s) and %d row count(s) passed. Next: ecs_deploy.",
                      service.name, len(results), len(counts))
        return {"checks": results, "row_counts": counts}
