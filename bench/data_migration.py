"""The data migration engine beside (a) one INSERT ... SELECT doing the same work, the practical limit, and (b) the
old LIMIT/OFFSET loop (rows fetched into Python, execute_batch, a commit per batch), on the same table in one run.
Also the engine's peak memory (RSS of its process) at each size: it must not grow with the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

TRANSFORM = "id, account, kind, length(payload), md5(payload)"
SPEC = {
    "table": "src", "key": "id", "batch_size": 20000,
    "statement": f"INSERT INTO dst_engine SELECT {TRANSFORM} FROM src WHERE id > :last_key AND id <= :upper_key",  # noqa: S608 - constant SQL
    "verify": "SELECT (SELECT count(*) FROM src) = (SELECT count(*) FROM dst_engine)",
    "reversible": False,
}
RUN_ENGINE = r"""
import json, resource, sys, time, pathlib, psycopg2
sys.path.insert(0, sys.argv[3])
from omnisphere_release.datamigrate import DataMigrationEngine, load_spec
t0 = time.perf_counter()
result = DataMigrationEngine(load_spec(pathlib.Path(sys.argv[2])), lambda: psycopg2.connect(sys.argv[1]),
                             run_by="bench").run()
print(json.dumps({"rows": result.rows, "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(admin_dsn: str, rows: int, offset_budget_s: float, state: Path) -> dict:
    import psycopg2
    import yaml
    from psycopg2 import sql
    from psycopg2.extras import execute_batch

    from devstack.postgres import create_scratch_database

    dsn = create_scratch_database(admin_dsn, "bench")
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE src (id bigint PRIMARY KEY, account bigint NOT NULL, kind text NOT NULL, "
                    "payload text NOT NULL)")
        cur.execute("INSERT INTO src SELECT g, g %% 9973, (ARRAY['login','logout','token'])[1 + g %% 3], "
                    "repeat(md5(g::text), 2) FROM generate_series(1, %s) g", [rows])
        for table in ("dst_single", "dst_engine", "dst_offset"):
            cur.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, account bigint, kind text, size int, "
                                "digest text)").format(sql.Identifier(table)))
        cur.execute("ANALYZE src")
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM src")
    conn.close()

    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        t0 = time.perf_counter()
        cur.execute(f"INSERT INTO dst_single SELECT {TRANSFORM} FROM src")  # noqa: S608 - constant SQL
    single_s = time.perf_counter() - t0

    spec_path = state / "bench_copy.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    out = subprocess.run([sys.executable, "-c", RUN_ENGINE, dsn, str(spec_path), str(REPO / "plugins")],
                         capture_output=True, text=True, check=True)
    engine = json.loads(out.stdout.strip().splitlines()[-1])
    assert engine["rows"] == rows

    conn = psycopg2.connect(dsn)
    batch, offset, done = 1000, 0, 0
    t0 = time.perf_counter()
    with conn.cursor() as cur:  # the old way, stopped after its time budget: it only gets slower further on
        while time.perf_counter() - t0 < offset_budget_s:
            cur.execute("SELECT id, account, kind, payload FROM src ORDER BY id LIMIT %s OFFSET %s", [batch, offset])
            fetched = cur.fetchall()
            if not fetched:
                break
            execute_batch(cur, "INSERT INTO dst_offset VALUES (%s, %s, %s, length(%s), md5(%s))",
                          [(r[0], r[1], r[2], r[3], r[3]) for r in fetched], page_size=500)
            conn.commit()
            offset += batch
            done += len(fetched)
    offset_s = time.perf_counter() - t0
    conn.close()
    return {
        "rows": rows,
        "single_statement_rows_s": rows / single_s,
        "engine_rows_s": rows / engine["seconds"],
        "offset_loop_rows_s": done / offset_s,
        "offset_loop_rows_done": done,
        "engine_peak_rss_mb": engine["peak_rss_mb"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    from devstack import stack

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--offset-budget", type=float, default=240.0,
                        help="seconds given to the OFFSET loop (enough for all of 1M rows here; at 5M it is stopped early, which flatters it)")
    args = parser.parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="omni-bench-data-"))
    results = []
    try:
        env = stack.start(state)
        for rows in args.sizes:
            r = measure(env["OMNI_PG_ADMIN_DSN"], rows, args.offset_budget, state)
            results.append(r)
            print(f"{rows:>9,} rows: engine {r['engine_rows_s']:,.0f} rows/s; one INSERT ... SELECT "
                  f"{r['single_statement_rows_s']:,.0f} rows/s (engine/statement "
                  f"{r['engine_rows_s'] / r['single_statement_rows_s']:.2f}x, target >= 0.5x); LIMIT/OFFSET loop "
                  f"{r['offset_loop_rows_s']:,.0f} rows/s over its first {r['offset_loop_rows_done']:,} rows "
                  f"(engine/loop {r['engine_rows_s'] / r['offset_loop_rows_s']:.0f}x, target >= 20x); engine peak RSS "
                  f"{r['engine_peak_rss_mb']:.0f} MB", flush=True)
        if len(results) > 1:
            small, large = results[0], results[-1]
            growth = large["engine_peak_rss_mb"] / small["engine_peak_rss_mb"]
            print(f"engine peak memory at {large['rows']:,} rows is {growth:.3f}x its peak at {small['rows']:,} "
                  f"rows (target within 1.10x)")
    finally:
        stack.stop(state)
        shutil.rmtree(state, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
