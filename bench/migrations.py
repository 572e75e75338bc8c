"""Applying 200 small migrations through the engine, beside `psql -f` of the same files concatenated, in one run.

The engine adds what psql does not: validation and checksums of every file, squawk lint, the advisory lock, one
transaction per migration with its timeouts and history row. The ratio is the price of that safety.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]


def write_migrations(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(1, count + 1):
        if i % 2:
            up = f"CREATE TABLE bench_{i} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, label text NOT NULL);"
            down = f"DROP TABLE bench_{i};"
        else:
            up = f"ALTER TABLE bench_{i - 1} ADD COLUMN note_{i} text;\nCOMMENT ON TABLE bench_{i - 1} IS 'step {i}';"
            down = f"ALTER TABLE bench_{i - 1} DROP COLUMN note_{i};"
        (folder / f"{i:04d}_step_{i}.up.sql").write_text(up + "\n")
        (folder / f"{i:04d}_step_{i}.down.sql").write_text(down + "\n")
    combined = folder.parent / "combined.sql"
    combined.write_text("".join((folder / f"{i:04d}_step_{i}.up.sql").read_text() for i in range(1, count + 1)))
    return combined


def main(argv: list[str] | None = None) -> dict:
    import psycopg2

    from devstack import stack
    from devstack.postgres import create_scratch_database
    from omnisphere_release.migrations import MigrationEngine

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--migrations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    state_dir = Path(tempfile.mkdtemp(prefix="omni-bench-migrations-"))
    try:
        env = stack.start(state_dir)
        admin = env["OMNI_PG_ADMIN_DSN"]
        psql = str(Path(env["OMNI_PG_BIN_DIR"]) / "psql")
        folder = state_dir / "migrations"
        combined = write_migrations(folder, args.migrations)

        def fresh_database() -> str:
            return create_scratch_database(admin, "bench")

        engine_times, psql_times = [], []
        for _ in range(args.rounds):
            dsn = fresh_database()
            t0 = time.perf_counter()
            subprocess.run([psql, dsn, "-q", "-v", "ON_ERROR_STOP=1", "-f", str(combined)], check=True,
                           capture_output=True)
            psql_times.append(time.perf_counter() - t0)
            dsn = fresh_database()
            engine = MigrationEngine("bench", folder, lambda dsn=dsn: psycopg2.connect(dsn), applied_by="bench")
            t0 = time.perf_counter()
            result = engine.migrate("up", reason="bench")
            engine_times.append(time.perf_counter() - t0)
            assert len(result.steps) == args.migrations
        figures = {"migrations": args.migrations, "engine_s": statistics.median(engine_times),
                   "psql_s": statistics.median(psql_times)}
        figures["ratio"] = figures["engine_s"] / figures["psql_s"]
    finally:
        stack.stop(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
    print(f"{args.migrations} migrations: engine {figures['engine_s']:.2f}s (lint, lock, a transaction and a history "
          f"row each), psql -f {figures['psql_s']:.2f}s; ratio {figures['ratio']:.2f}x (target < 2x), "
          f"median of {args.rounds}")
    return figures


if __name__ == "__main__":
    main()
