"""A rehearsal's database work beside the same work done by hand, in one run.

Both start from the same pg_dump of auth-service at version 3 with N users and end with version 4 applied on a fresh
copy. By hand: `createdb`, `pg_restore --dbname` of the dump file, `psql -f` of the pending up file. The rehearsal:
ScratchDatabase.create, the verified restore from S3 (download, sha256 check, one transaction), then each pending
migration through the engine with its table locks probed first (rehearsal.apply_measured). The ratio is the price of
the download, the checks, the single-transaction restore and the lock probe.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]


def main(argv: list[str] | None = None) -> dict:
    import boto3
    import psycopg2
    from psycopg2.extensions import parse_dsn

    from devstack import stack
    from devstack.aws import BACKUP_BUCKET
    from devstack.postgres import create_scratch_database
    from omnisphere_release.catalog import load_catalog
    from omnisphere_release.hooks.backups import BackupHook, libpq_env
    from omnisphere_release.migrations import EngineSettings, MigrationEngine
    from omnisphere_release.rehearsal import ScratchDatabase, apply_measured

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    log = logging.getLogger("bench.rehearsal")
    state_dir = Path(tempfile.mkdtemp(prefix="omni-bench-rehearsal-"))
    try:
        env = stack.start(state_dir)
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_") or k == "OMNI_PG_BIN_DIR"})
        admin = env["OMNI_PG_ADMIN_DSN"]
        bin_dir = Path(env["OMNI_PG_BIN_DIR"])
        catalog = load_catalog()
        service = catalog.get("auth-service")
        folder = catalog.migrations_dir(service.name)

        source = create_scratch_database(admin, "bench_source")
        MigrationEngine(service.name, folder, lambda: psycopg2.connect(source)).migrate("up", 3, reason="bench")
        with psycopg2.connect(source) as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO users (email, password_hash) SELECT 'user' || i || '@example.com', md5(i::text) "
                        "FROM generate_series(1, %s) i", [args.users])
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        record = BackupHook(parse_dsn(source), s3).dump_to_s3(BACKUP_BUCKET, "bench/rehearsal.dump")
        dump_file = state_dir / "rehearsal.dump"
        s3.download_file(BACKUP_BUCKET, "bench/rehearsal.dump", str(dump_file))
        pending = [m for m in sorted(folder.glob("*.up.sql")) if int(m.name.split("_", 1)[0]) > 3]
        admin_kwargs = parse_dsn(admin)

        by_hand, rehearsal = [], []
        for round_number in range(args.rounds):
            name = f"rehearse_bench_hand_{round_number}"
            started = time.monotonic()
            pg_env = libpq_env(admin_kwargs)
            subprocess.run([str(bin_dir / "createdb"), name], env=pg_env, check=True)
            subprocess.run([str(bin_dir / "pg_restore"), "--no-owner", "--no-privileges", f"--dbname={name}",
                            str(dump_file)], env=pg_env, check=True)
            for path in pending:
                subprocess.run([str(bin_dir / "psql"), "--no-psqlrc", "--quiet", "-v", "ON_ERROR_STOP=1",
                                f"--dbname={name}", "-f", str(path)], env=pg_env, check=True,
                               stdout=subprocess.DEVNULL)
            by_hand.append(time.monotonic() - started)
            ScratchDatabase(admin_kwargs, name).drop()

            scratch = ScratchDatabase(admin_kwargs, f"rehearse_bench_{round_number}")
            started = time.monotonic()
            scratch.create()
            BackupHook(scratch.connect_kwargs, s3).restore_from_s3(BACKUP_BUCKET, "bench/rehearsal.dump",
                                                                  record.sha256)
            engine = MigrationEngine(service.name, folder, lambda s=scratch: s.connect("omni-bench-rehearsal"),
                                     EngineSettings.from_catalog(service.migrations), applied_by="bench", log=log)
            measured = apply_measured(engine, scratch, engine.plan("up"), "omni-bench-rehearsal",
                                      service.migrations.lock_timeout_ms, log)
            rehearsal.append(time.monotonic() - started)
            scratch.drop()
            assert [s["version"] for s in measured["steps"]] == [4], measured

        hand, ours = statistics.median(by_hand), statistics.median(rehearsal)
        figures = {"users": args.users, "dump_mb": round(record.size_bytes / 1e6, 1),
                   "by_hand_seconds": round(hand, 2), "rehearsal_seconds": round(ours, 2),
                   "rehearsal_vs_by_hand": round(ours / hand, 2)}
        print(f"rehearsal: {args.users} users ({figures['dump_mb']} MB dump), median of {args.rounds} rounds: "
              f"pg_restore + psql -f {hand:.2f}s, rehearsal (verified restore + engine + lock probe) {ours:.2f}s "
              f"= {ours / hand:.2f}x")
        return figures
    finally:
        stack.stop(state_dir)


if __name__ == "__main__":
    main()
