"""The data migration engine beside what it replaces and what it competes with, on the same table in one run.

Each variant copies the same rows with the same transformation into a table of its own:
- one INSERT ... SELECT: the practical limit, and the baseline of every ratio;
- the engine with a SQL statement, and with a Python function (the same SQL, run by a function): batches sized to
  ~0.5 s within the spec's bounds, a checkpoint per batch, the verification at the end (counted in its time);
- a plain keyset loop with a checkpoint row (fixed batches, no pause, no progress, no verification): the least a
  resumable loop can do;
- the migration guide's own loop as written, LIMIT 1000 OFFSET k with the ORDER BY it needs to be correct: rows
  fetched into Python, execute_batch, a commit and a print per batch. It slows down as the offset grows, so it gets a
  time budget; when stopped early its rate flatters it.
The machine is shared, so every variant but the guide's runs ``--repeats`` times, interleaved, after a CHECKPOINT, and
each figure is the median. Also the engine's peak memory (RSS of its process) at each size: it must not grow with the
table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

TRANSFORM = "id, account, kind, length(payload), md5(payload)"
FIRST_BATCH = 20_000
GUIDE_BATCH = 1000
FLOOR = 0.9  # issue #17: the engine at >= 0.9x one INSERT ... SELECT at 1M rows
VARIANTS = ("single", "engine", "python", "keyset")
LABELS = {
    "single": "one INSERT ... SELECT",
    "engine": "engine, SQL statement",
    "python": "engine, Python function",
    "keyset": "plain keyset loop + checkpoint",
    "guide": f"guide's loop (LIMIT {GUIDE_BATCH} OFFSET)",
}


def spec(target: str, batch: dict[str, Any]) -> dict[str, Any]:
    """Return the engine's spec that copies src into ``target`` with a statement or with :func:`copy_batch`."""
    return {
        "table": "src", "key": "id", "batch_size": FIRST_BATCH,
        **batch,
        "verify": f"SELECT (SELECT count(*) FROM src) = (SELECT count(*) FROM {target})",  # noqa: S608 - constant SQL
        "reversible": False,
    }


def copy_batch(conn: Any, last_key: int, upper_key: int) -> int:
    """Copy one key range of src into dst_python: the Python-function form of the engine's SQL spec."""
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO dst_python SELECT {TRANSFORM} FROM src WHERE id > %s AND id <= %s",  # noqa: S608
                    [last_key, upper_key])
        return cur.rowcount


RUN_ENGINE = r"""
import json, resource, sys, time, pathlib, psycopg2
sys.path[:0] = [sys.argv[3], sys.argv[4]]
from omnisphere_release.datamigrate import DataMigrationEngine, load_spec
import omnisphere_release.catalog  # loaded in every Airflow task already; the engine reads the include folder from it
t0 = time.perf_counter()
result = DataMigrationEngine(load_spec(pathlib.Path(sys.argv[2])), lambda: psycopg2.connect(sys.argv[1]),
                             run_by="bench").run()
print(json.dumps({"rows": result.rows, "seconds": time.perf_counter() - t0, "batches": result.batches,
                  "verify_seconds": result.verify_seconds,
                  "smallest_batch": result.smallest_batch, "largest_batch": result.largest_batch,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(admin_dsn: str, rows: int, repeats: int, offset_budget_s: float, state: Path) -> dict:
    import psycopg2
    import yaml
    from psycopg2 import sql
    from psycopg2.extras import execute_batch

    from devstack.postgres import create_scratch_database

    dsn = create_scratch_database(admin_dsn, "bench")
    tables = {name: f"dst_{name}" for name in (*VARIANTS, "guide")}
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE src (id bigint PRIMARY KEY, account bigint NOT NULL, kind text NOT NULL, "
                    "payload text NOT NULL)")
        cur.execute("INSERT INTO src SELECT g, g %% 9973, (ARRAY['login','logout','token'])[1 + g %% 3], "
                    "repeat(md5(g::text), 2) FROM generate_series(1, %s) g", [rows])
        for table in tables.values():
            cur.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, account bigint, kind text, size int, "
                                "digest text)").format(sql.Identifier(table)))
        cur.execute("CREATE TABLE keyset_checkpoint (name text PRIMARY KEY, last_key bigint NOT NULL, "
                    "rows_done bigint NOT NULL, updated_at timestamptz NOT NULL)")
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("VACUUM ANALYZE src")

    specs = {
        "engine": state / "bench_copy.yaml",
        "python": state / "bench_copy_python.yaml",
    }
    specs["engine"].write_text(yaml.safe_dump(spec("dst_engine", {"statement": (
        f"INSERT INTO dst_engine SELECT {TRANSFORM} FROM src WHERE id > :last_key AND id <= :upper_key")})))  # noqa: S608
    specs["python"].write_text(yaml.safe_dump(spec("dst_python", {"python": "bench.data_migration:copy_batch"})))

    def fresh(variant: str) -> None:
        """Empty the variant's table and checkpoint, and start it from a checkpointed server (no WAL debt)."""
        with admin.cursor() as cur:
            cur.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(tables[variant])))
            cur.execute("DROP TABLE IF EXISTS omnisphere_data_migrations")
            cur.execute("DELETE FROM keyset_checkpoint")
            cur.execute("CHECKPOINT")

    def single() -> dict:
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            t0 = time.perf_counter()
            cur.execute(f"INSERT INTO dst_single SELECT {TRANSFORM} FROM src")  # noqa: S608 - constant SQL
        return {"rows": rows, "seconds": time.perf_counter() - t0}

    def engine(variant: str) -> dict:
        out = subprocess.run([sys.executable, "-c", RUN_ENGINE, dsn, str(specs[variant]), str(REPO / "plugins"),
                              str(REPO)], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["rows"] == rows, result
        return result

    def keyset() -> dict:
        """A plain resumable loop: the next upper key, the batch, the checkpoint row, a commit. Nothing else."""
        conn = psycopg2.connect(dsn)
        last, batches = 0, 0
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute("INSERT INTO keyset_checkpoint VALUES ('copy', 0, 0, now())")
            conn.commit()
            while True:
                cur.execute("SELECT max(id) FROM (SELECT id FROM src WHERE id > %s ORDER BY id LIMIT %s) b",
                            [last, FIRST_BATCH])
                (upper,) = cur.fetchone() or (None,)
                if upper is None:
                    break
                cur.execute(f"INSERT INTO dst_keyset SELECT {TRANSFORM} FROM src WHERE id > %s AND id <= %s",  # noqa: S608
                            [last, upper])
                cur.execute("UPDATE keyset_checkpoint SET last_key = %s, rows_done = rows_done + %s, "
                            "updated_at = now() WHERE name = 'copy'", [upper, cur.rowcount])
                conn.commit()
                last, batches = upper, batches + 1
        conn.commit()
        seconds = time.perf_counter() - t0
        conn.close()
        return {"rows": rows, "seconds": seconds, "batches": batches}

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):  # interleaved: a busy minute on the shared machine hits every variant alike
        for variant in VARIANTS:
            fresh(variant)
            runs[variant].append(single() if variant == "single" else keyset() if variant == "keyset"
                                 else engine(variant))

    # The guide's loop, as written but for its ORDER BY: without one, LIMIT/OFFSET pages come in no defined order
    # and rows are skipped or copied twice.
    fresh("guide")
    conn = psycopg2.connect(dsn)
    done = 0
    t0 = time.perf_counter()
    with conn.cursor() as cur, open(os.devnull, "w") as console:
        offset = 0
        while time.perf_counter() - t0 < offset_budget_s:
            cur.execute("SELECT id, account, kind, payload FROM src ORDER BY id LIMIT %s OFFSET %s",
                        [GUIDE_BATCH, offset])
            fetched = cur.fetchall()
            if not fetched:
                break
            execute_batch(cur, "INSERT INTO dst_guide VALUES (%s, %s, %s, length(%s), md5(%s))",
                          [(r[0], r[1], r[2], r[3], r[3]) for r in fetched])
            conn.commit()
            offset += GUIDE_BATCH
            done += len(fetched)
            print(f"Migrated {done} rows", file=console)
    guide_s = time.perf_counter() - t0
    conn.close()
    admin.close()

    def median_rate(variant: str) -> float:
        return rows / statistics.median(r["seconds"] for r in runs[variant])

    def round_ratios(variant: str, seconds: str = "seconds") -> list[float]:
        """Throughput against the INSERT ... SELECT of the same round, run just before: load drift cancels out."""
        return [b["seconds"] / (r[seconds] if seconds == "seconds" else r["seconds"] - r["verify_seconds"])
                for b, r in zip(runs["single"], runs[variant], strict=True)]

    return {
        "rows": rows,
        "repeats": repeats,
        **{f"{v}_rows_s": median_rate(v) for v in VARIANTS},
        **{f"{v}_seconds": [round(r["seconds"], 2) for r in runs[v]] for v in VARIANTS},
        **{f"{v}_ratios": round_ratios(v) for v in VARIANTS},
        "engine_batches_ratios": round_ratios("engine", "batches"),
        "guide_rows_s": done / guide_s,
        "guide_rows_done": done,
        "keyset_batch": FIRST_BATCH,
        "engine_batches": [r["batches"] for r in runs["engine"]],
        "engine_batch_range": [min(r["smallest_batch"] for r in runs["engine"]),
                               max(r["largest_batch"] for r in runs["engine"])],
        "python_batch_range": [min(r["smallest_batch"] for r in runs["python"]),
                               max(r["largest_batch"] for r in runs["python"])],
        "engine_verify_seconds": statistics.median(r["verify_seconds"] for r in runs["engine"]),
        "engine_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["engine"]),
    }


def report(r: dict) -> None:
    base = r["single_rows_s"]
    whole = "the whole table" if r["guide_rows_done"] == r["rows"] else f"its first {r['guide_rows_done']:,} rows"

    def ratio(key: str) -> float:
        return statistics.median(r[f"{key}_ratios"])

    # The floor is judged on the migration itself: the INSERT ... SELECT verifies nothing, so the spec's own
    # verification query (here two count(*) of 1M rows) is shown beside the figure, not inside it.
    print(f"{r['rows']:>9,} rows: engine {ratio('engine_batches'):.2f}x one INSERT ... SELECT ({base:,.0f} rows/s; floor "
          f"{FLOOR}x), {ratio('engine'):.2f}x with the spec's verification query after it "
          f"({r['engine_verify_seconds']:.2f} s). Ratios: medians of each round's ratio to that round's INSERT ... "
          f"SELECT; rates: medians of {r['repeats']} rounds", flush=True)
    lines = [
        ("single", ""),
        ("engine", f"{statistics.median(r['engine_batches']):.0f} batches of {r['engine_batch_range'][0]:,} to "
                   f"{r['engine_batch_range'][1]:,} keys (first {FIRST_BATCH:,}, target ~0.5 s), verification "
                   f"({r['engine_verify_seconds']:.2f} s) included; without it {ratio('engine_batches'):.2f}x"),
        ("python", f"batches of {r['python_batch_range'][0]:,} to {r['python_batch_range'][1]:,} keys"),
        ("keyset", f"batches of {r['keyset_batch']:,}, no verification"),
    ]
    for variant, note in lines:
        rate = r[f"{variant}_rows_s"]
        rounds = ", ".join(f"{x:.2f}" for x in r[f"{variant}_ratios"])
        print(f"    {LABELS[variant]:<34} {rate:>11,.0f} rows/s  {ratio(variant):5.2f}x   runs {r[f'{variant}_seconds']} s"
              + (f" ({rounds})" if variant != "single" else "") + (f"; {note}" if note else ""), flush=True)
    print(f"    {LABELS['guide']:<34} {r['guide_rows_s']:>11,.0f} rows/s  {r['guide_rows_s'] / base:5.2f}x   over "
          f"{whole}, batches of {GUIDE_BATCH:,} (engine/guide {r['engine_rows_s'] / r['guide_rows_s']:.0f}x)",
          flush=True)
    print(f"    engine peak RSS {r['engine_peak_rss_mb']:.0f} MB", flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    from devstack import stack

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant but the guide's loop (median)")
    parser.add_argument("--offset-budget", type=float, default=240.0,
                        help="seconds given to the guide's LIMIT/OFFSET loop (enough for all of 1M rows on an idle "
                             "machine; at 5M it is stopped early, which flatters it)")
    args = parser.parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="omni-bench-data-"))
    results = []
    try:
        env = stack.start(state)
        for rows in args.sizes:
            r = measure(env["OMNI_PG_ADMIN_DSN"], rows, args.repeats, args.offset_budget, state)
            results.append(r)
            report(r)
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
