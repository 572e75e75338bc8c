"""``python -m devstack start|stop|status|run``: control the local stack (see devstack/stack.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from devstack import stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    parser.add_argument("command", choices=["start", "stop", "status", "run"])
    parser.add_argument("--state-dir", type=Path, default=stack.DEFAULT_STATE_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "run":
        stack.run(args.state_dir.resolve())
        return 0
    if args.command == "start":
        env = stack.start(args.state_dir)
        services = sorted(k.removeprefix("OMNI_PG_DSN_").lower() for k in env if k.startswith("OMNI_PG_DSN_"))
        print(f"devstack ready: PostgreSQL databases {', '.join(services)}; AWS endpoint {env['AWS_ENDPOINT_URL']}")
        print(f"load it with:  . {args.state_dir / 'env'}")
        return 0
    if args.command == "stop":
        leftovers = stack.stop(args.state_dir)
        if leftovers:
            print(f"devstack stopped, but still listening: {', '.join(leftovers)}", file=sys.stderr)
            return 1
        print("devstack stopped; no process or port left")
        return 0
    running = stack.is_running(args.state_dir.resolve())
    print("devstack is running" if running else "devstack is not running")
    return 0 if running else 1


if __name__ == "__main__":
    sys.exit(main())
