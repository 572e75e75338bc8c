"""Command line: ``python -m omnisphere_release.datamigrate <service> <name> <run|revert|pause|status> [--reason ...]``.

The database comes from ``OMNI_PG_DSN_<SERVICE>``. ``run`` and ``revert`` change data and need --reason, kept in the
checkpoint; ``pause`` (a request to the running migration) and ``status`` need none.
``run`` and ``revert`` also take the service's lease (one operation per service at a time, as every Airflow release,
rollback and migration does) and give it up when they end, also on an error or Ctrl-C: refused, exit 2, while an
Airflow run or another command holds the service (see ``omnisphere_release.locks.cli_lease``).
Exit codes: 0 done (or paused on request), 1 failed, 2 bad input or refused (nothing changed).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys

import psycopg2

from omnisphere_release.catalog import CatalogError, load_catalog
from omnisphere_release.datamigrate.engine import DataMigrationEngine
from omnisphere_release.datamigrate.spec import load_spec
from omnisphere_release.locks import ServiceBusy, airflow_run_is_over_from_env, cli_lease
from omnisphere_release.migrations.errors import InvalidMigrationInput, MigrationError

CHANGING_ACTIONS = {"run", "revert"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omnisphere_release.datamigrate", description=__doc__)
    parser.add_argument("service")
    parser.add_argument("name", help="the spec's file name in include/sql/<service>/data/, without .yaml")
    parser.add_argument("action", choices=["run", "revert", "pause", "status"])
    parser.add_argument("--max-batches", type=int, help="stop after this many batches (resume later)")
    parser.add_argument("--reason", help="why the data changes (required by run and revert); kept in the checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        catalog = load_catalog()
        service = catalog.get(args.service)
        path = catalog.sql_dir / service.name / "data" / f"{args.name}.yaml"
        if not path.exists():
            raise InvalidMigrationInput(f"{path}: no such data migration")
        reason = (args.reason or "").strip()
        if args.action in CHANGING_ACTIONS and not reason:
            raise InvalidMigrationInput(f"{args.action} changes data: give --reason '...' (why; it is kept in the "
                                        f"checkpoint). Nothing was changed.")
        dsn = os.environ.get(f"OMNI_PG_DSN_{service.env_suffix}")
        if not dsn:
            raise InvalidMigrationInput(f"OMNI_PG_DSN_{service.env_suffix} is not set (locally: . .devstack/env)")
        engine = DataMigrationEngine(load_spec(path), lambda: psycopg2.connect(dsn),
                                     run_by=f"cli:{getpass.getuser()}" + (f" ({reason})" if reason else ""))
        if args.action == "status":
            checkpoint = engine.status()
            print(checkpoint.describe() if checkpoint else f"{args.name}: never run")
        elif args.action == "pause":
            engine.request_pause()
            print(f"{args.name}: pause requested; it stops after its current batch")
        else:
            operation = f"data migration {args.name} {args.action} of {service.name}: {reason}"[:200]
            try:
                with cli_lease(service.name, lambda: psycopg2.connect(dsn), "omni-datamigrate", args.action,
                               operation, airflow_run_is_over_from_env):
                    result = engine.run("forward" if args.action == "run" else "revert",
                                        max_batches=args.max_batches)
            except ServiceBusy as exc:
                raise InvalidMigrationInput(f"{exc} Nothing was changed.") from None
            print(f"{result.name} {result.direction}: {result.state}, {result.rows} rows in {result.batches} "
                  f"batches" + (f" of {result.smallest_batch} to {result.largest_batch} keys" if result.batches else "")
                  + f", {result.seconds:.1f}s")
    except (CatalogError, InvalidMigrationInput) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    except (MigrationError, psycopg2.Error) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the batches that committed stay, recorded in the checkpoint, and the service's lease was "
              "given up; the same command again goes on from there, `status` shows where it stopped", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
