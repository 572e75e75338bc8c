"""`make up` / `make down`: the Airflow UI on http://localhost:8080 with the devstack behind it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

from devstack import airflow_server, stack  # noqa: E402

HOME = REPO / ".airflow"


def main(command: str) -> int:
    port = int(os.environ.get("OMNI_AIRFLOW_PORT", "8080"))
    if command == "up":
        env = stack.start(stack.DEFAULT_STATE_DIR)
        print("devstack ready; starting Airflow (API server, scheduler, DAG processor, triggerer)...", flush=True)
        info = airflow_server.start(env, HOME, port)
        print(f"Airflow UI: http://localhost:{port}   user: {info['username']}   password: {info['password']}")
        print(f"Logs: {HOME / 'standalone.log'}; stop everything with `make down`.")
        return 0
    airflow_server.stop(HOME)
    leftovers = stack.stop(stack.DEFAULT_STATE_DIR)
    print("Airflow and the devstack are stopped." if not leftovers else f"Still listening: {leftovers}")
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "up"))
