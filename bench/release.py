"""The release's backup and restore stages beside raw pg_dump / pg_restore of the same database, and the
orchestration overhead of a whole release with trivial work, per task, beside a DAG of no-op tasks. One run each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]


def fill(dsn: str, rows: int) -> None:
    import psycopg2

    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS bench_events (id bigint PRIMARY KEY, account bigint NOT NULL, "
                    "kind text NOT NULL, payload text NOT NULL, at timestamptz NOT NULL DEFAULT now())")
        cur.execute("TRUNCATE bench_events")
        cur.execute("INSERT INTO bench_events (id, account, kind, payload) SELECT g, g %% 9973, "
                    "(ARRAY['login','logout','token','refresh'])[1 + g %% 4], md5(g::text) || repeat('x', 40) "
                    "FROM generate_series(1, %s) g", [rows])
        cur.execute("CREATE INDEX IF NOT EXISTS bench_events_account ON bench_events (account)")


def backup_restore(env: dict[str, str], rows: int, rounds: int) -> dict:
    import boto3
    import psycopg2

    from omnisphere_release.hooks.backups import BackupHook, libpq_env, pg_program

    dsn = env["OMNI_PG_DSN_AUTH_SERVICE"]
    fill(dsn, rows)
    params = psycopg2.extensions.parse_dsn(dsn)
    kwargs = {"host": params["host"], "port": params["port"], "user": params["user"], "password": params["password"],
              "dbname": params["dbname"]}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="eu-west-1",
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    hook = BackupHook(kwargs, s3)
    bucket = env["AIRFLOW_VAR_OMNI_BACKUP_BUCKET"]
    raw_dump, stage_dump, raw_restore, stage_restore = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "raw.dump"
        for _ in range(rounds):
            t0 = time.perf_counter()
            subprocess.run([pg_program("pg_dump"), "--format=custom", f"--file={file}"], env=libpq_env(kwargs),
                           check=True)
            raw_dump.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            record = hook.dump_to_s3(bucket, f"bench/{uuid.uuid4().hex}.dump")
            stage_dump.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run([pg_program("pg_restore"), "--clean", "--if-exists", "--no-owner", "--single-transaction",
                            f"--dbname={kwargs['dbname']}", str(file)], env=libpq_env(kwargs), check=True)
            raw_restore.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hook.restore_from_s3(bucket, record.key, record.sha256)
            stage_restore.append(time.perf_counter() - t0)
    figures = {"rows": rows, "dump_bytes": record.size_bytes,
               "raw_dump_s": statistics.median(raw_dump), "stage_dump_s": statistics.median(stage_dump),
               "raw_restore_s": statistics.median(raw_restore), "stage_restore_s": statistics.median(stage_restore)}
    figures["backup_ratio"] = figures["stage_dump_s"] / figures["raw_dump_s"]
    figures["restore_ratio"] = figures["stage_restore_s"] / figures["raw_restore_s"]
    print(f"backup of {rows} rows ({record.size_bytes / 1e6:.1f} MB dump): stage {figures['stage_dump_s']:.2f}s "
          f"(pg_dump, pg_restore --list, sha256, encrypted upload) vs raw pg_dump {figures['raw_dump_s']:.2f}s; "
          f"ratio {figures['backup_ratio']:.2f}x (target < 1.2x)")
    print(f"restore: stage {figures['stage_restore_s']:.2f}s (download, sha256, one-transaction restore) vs raw "
          f"pg_restore --single-transaction {figures['raw_restore_s']:.2f}s; ratio {figures['restore_ratio']:.2f}x "
          f"(target < 1.2x)")
    return figures


NOOP_DAG = '''
from airflow.sdk import DAG
from airflow.providers.standard.operators.python import PythonOperator
with DAG("bench_noop", schedule=None, tags=["bench"]) as dag:
    previous = None
    for i in range({n}):
        t = PythonOperator(task_id=f"noop_{{i}}", python_callable=lambda: None)
        if previous:
            previous >> t
        previous = t
'''


def orchestration(dags_dir: Path) -> dict:
    """Time a whole release with trivial work (no migration, a 0-minute bake) and a DAG of as many no-op tasks."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dags_dir))
    release, noop = bag.dags["release_auth-service"], bag.dags["bench_noop"]
    t0 = time.perf_counter()
    run = noop.test()
    noop_s = time.perf_counter() - t0
    assert "success" in str(run.state)
    import boto3

    from devstack.aws import push_image

    tag = f"9.{uuid.uuid4().hex[:6]}"
    push_image(boto3.client("ecr", endpoint_url=os.environ["AWS_ENDPOINT_URL"]), "auth-service", tag)
    from devstack.dag_test import dag_processor

    t0 = time.perf_counter()
    with dag_processor(release):  # its DAG callbacks (the team's news) as the DAG processor runs them
        run = release.test(run_conf={"image_tag": tag, "bake_minutes": 0, "migrate": False, "reason": "bench",
                                     "window": "now", "force_reason": "bench"})
    release_s = time.perf_counter() - t0
    assert "success" in str(run.state), f"the bench release failed: {run.state}"
    tasks = len(release.tasks)
    figures = {"tasks": tasks, "release_s": release_s, "noop_s": noop_s,
               "release_per_task_s": release_s / tasks, "noop_per_task_s": noop_s / tasks}
    figures["ratio"] = figures["release_per_task_s"] / figures["noop_per_task_s"]
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from devstack import stack

    state_dir = Path(tempfile.mkdtemp(prefix="omni-bench-release-"))
    home = Path(tempfile.mkdtemp(prefix="omni-bench-airflow-"))
    try:
        env = stack.start(state_dir)
        os.environ.update({k: v for k, v in env.items() if not k.startswith("AIRFLOW__CORE__") and k != "AIRFLOW_HOME"})
        # dag.test() runs DAGs of the configured DAG folder: one with the project's DAGs and the no-op baseline.
        dags_dir = home / "dags"
        dags_dir.mkdir()
        shutil.copy(REPO / "dags" / "omnisphere_dags.py", dags_dir)
        (dags_dir / "bench_noop.py").write_text(NOOP_DAG.format(n=15))
        # The plugins folder registers the maintenance-window timetable, without which release_all cannot serialize.
        os.environ.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                           "AIRFLOW__CORE__DAGS_FOLDER": str(dags_dir),
                           "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins")})
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
        figures = {"backup_restore": backup_restore(env, args.rows, args.rounds)}
        from omnisphere_release.migrations.__main__ import main as migrate

        migrate(["auth-service", "up", "--reason", "bench"])  # the release's integrity checks read its tables
        log_path = Path(tempfile.gettempdir()) / "omni-bench-release-orchestration.log"
        with open(log_path, "w") as sink:  # Airflow's task output; read it if the bench release fails
            saved = os.dup(1), os.dup(2)
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                result = orchestration(dags_dir)
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        figures["orchestration"] = result
        print(f"whole release with trivial work: {result['release_s']:.1f}s for {result['tasks']} tasks = "
              f"{result['release_per_task_s']:.2f}s per task; a DAG of {result['tasks']} no-op tasks: "
              f"{result['noop_per_task_s']:.2f}s per task; ratio {result['ratio']:.2f}x")
    finally:
        stack.stop(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    return figures


if __name__ == "__main__":
    main()
