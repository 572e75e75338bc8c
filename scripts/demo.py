"""`make demo`: the main job on the local stack, end to end, with a summary a person can read.

For now the main job is the schema migrations: a dry run of every service (the plan, changing nothing), then the
real run of the schema_migrations DAG in dependency order, then each database's version. Airflow's own output goes to
a log file; the summary says where.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

from devstack import stack  # noqa: E402

SERVICES = ("auth-service", "billing-service", "notification-service")


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr (Airflow's task logs) to ``path`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)


def say(message: str) -> None:
    print(message, flush=True)


def main() -> int:
    started_here = not stack.is_running(stack.DEFAULT_STATE_DIR)
    say("1/4 Starting the devstack (PostgreSQL, local AWS endpoint with the ECS simulator, sample services)...")
    env = stack.start(stack.DEFAULT_STATE_DIR)
    os.environ.update(env)
    log_path = stack.DEFAULT_STATE_DIR / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        say("2/4 Preparing Airflow's metadata database in .airflow/ ...")
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=os.environ.copy())
        with output_to(log_path):
            from omnisphere_release.migrations.__main__ import main as migrate_cli

            for service in SERVICES:  # start from empty databases so that the demo can be run again
                migrate_cli([service, "down", "--to", "0", "--reason", "make demo: start from scratch"])

        from airflow.dag_processing.dagbag import DagBag

        with output_to(log_path):
            bag = DagBag(dag_folder=str(REPO / "dags"))
        if bag.import_errors:
            say(f"DAG import errors: {bag.import_errors}")
            return 1
        dag = bag.dags["schema_migrations"]
        say("3/4 Dry run of schema_migrations for all services (prints the plan, changes nothing)...")
        with output_to(log_path):
            dry = dag.test(run_conf={"service": "all"})
        say(f"    dry run: {state(dry)}")
        say("4/4 Applying schema_migrations for all services, in depends_on order...")
        t0 = time.monotonic()
        with output_to(log_path):
            real = dag.test(run_conf={"service": "all", "dry_run": False, "reason": "make demo"})
        elapsed = time.monotonic() - t0
        results = {}
        for ti in real.get_task_instances():
            if ti.task_id.startswith("migrate_wave_") and ti.map_index >= 0:
                results[(ti.task_id, ti.map_index)] = str(ti.state)
        say("")
        say(f"schema_migrations run: {state(real).upper()} in {elapsed:.1f}s "
            f"({sum(1 for s in results.values() if 'success' in s)} of {len(results)} service migrations succeeded)")
        say(f"{'service':<22}{'version':>8}  applied migrations")
        for service in SERVICES:
            applied = history(env, service)
            say(f"{service:<22}{(applied[-1][0] if applied else 0):>8}  {', '.join(f'{v:03d}_{n}' for v, n in applied)}")
        say("")
        say(f"Airflow's task logs of both runs: {log_path}")
        say("Next: `make up` opens the Airflow UI on http://localhost:8080 with the same stack.")
        return 0 if state(real) == "success" and state(dry) == "success" else 1
    finally:
        if started_here:
            stack.stop(stack.DEFAULT_STATE_DIR)
            say("The devstack was stopped (run `make devstack` first to keep it running after the demo).")


def state(run) -> str:
    return str(run.state.value if hasattr(run.state, "value") else run.state)


def history(env: dict[str, str], service: str) -> list[tuple[int, str]]:
    import psycopg2

    with psycopg2.connect(env[f"OMNI_PG_DSN_{service.upper().replace('-', '_')}"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT version, name FROM omnisphere_schema_history WHERE state = 'applied' ORDER BY version")
        return cur.fetchall()


if __name__ == "__main__":
    sys.exit(main())
