"""`make up` / `make down`: the Airflow UI on http://localhost:8080 (OMNI_AIRFLOW_PORT) with the devstack behind it.

    make up                   airflow standalone (SQLite metadata, one process tree)
    make up EXECUTOR=celery   the production topology: PostgreSQL metadata, Redis, API server, scheduler,
                              DAG processor, triggerer and two Celery workers, each supervised (devstack/topology.py)
    make down                 stops whichever runs, and the devstack; exits 1 if a port is still open
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

from devstack import airflow_server, stack, topology  # noqa: E402

HOME = REPO / ".airflow"


def up(executor: str, port: int) -> int:
    if executor == "celery" and airflow_server.is_running(HOME):
        print("airflow standalone runs already (`make up`): stop it with `make down` first.", file=sys.stderr)
        return 1
    if executor == "standalone" and topology.is_running(HOME):
        print("the Celery topology runs already (`make up EXECUTOR=celery`): stop it with `make down` first.",
              file=sys.stderr)
        return 1
    if executor == "celery":
        try:
            topology.require_redis()  # before anything starts
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
    env = stack.start(stack.DEFAULT_STATE_DIR)
    if executor == "celery":
        print("devstack ready; starting the Celery topology (Redis, API server, scheduler, DAG processor, triggerer, "
              "two Celery workers)...", flush=True)
        try:
            topo = topology.start(env, HOME, port)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        info = {"url": topo.url, "username": topo.username, "password": topo.password}
        logs = f"{HOME}/<part>.log for each of {', '.join(topology.PARTS)}; the supervisor's in {HOME / 'topology.log'}"
    else:
        print("devstack ready; starting Airflow (API server, scheduler, DAG processor, triggerer)...", flush=True)
        info = airflow_server.start(env, HOME, port)
        logs = str(HOME / "standalone.log")
    print(f"Airflow UI: http://localhost:{port}   user: {info['username']}   password: {info['password']}")
    print(f"Logs: {logs}; stop everything with `make down`.")
    return 0


def down() -> int:
    leftovers = topology.stop(HOME) + airflow_server.stop(HOME) + stack.stop(stack.DEFAULT_STATE_DIR)
    print("Airflow and the devstack are stopped." if not leftovers else f"Still listening: {leftovers}")
    return 1 if leftovers else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/airflow_local.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down"], nargs="?", default="up")
    parser.add_argument("--executor", choices=["standalone", "celery"], default="standalone",
                        help="standalone: airflow standalone; celery: the production topology")
    args = parser.parse_args(argv)
    if args.command == "down":
        return down()
    return up(args.executor, int(os.environ.get("OMNI_AIRFLOW_PORT", "8080")))


if __name__ == "__main__":
    sys.exit(main())
