"""Command line: ``python -m omnisphere_release.migrations <service|all> <up|down|status|plan|resolve> [--to N]``.

The replacement of ``run-migrations.sh <service|all> <up|down>``. The database of service ``auth-service`` is read from
``OMNI_PG_DSN_AUTH_SERVICE`` (never from the command line, where every user of the machine could read it).
A change (up, down, resolve) needs --reason, kept in the migration log; plan, status and --dry-run need none.
Exit codes: 0 done, 1 failed, 2 bad input or refused (nothing changed).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import socket
import sys

import psycopg2

from omnisphere_release.catalog import CatalogError, load_catalog
from omnisphere_release.migrations.engine import EngineSettings, MigrationEngine
from omnisphere_release.migrations.errors import InvalidMigrationInput, MigrationError

EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
READ_ONLY_ACTIONS = {"plan", "status"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m omnisphere_release.migrations",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("service", help="a catalog service name, or 'all' (in depends_on order; down in reverse)")
    parser.add_argument("action", choices=["up", "down", "status", "plan", "resolve"])
    parser.add_argument("--to", type=int, dest="target", help="target version (up: apply up to it; down: revert "
                        "every version above it, 0 for all; default: up to the latest, down by one)")
    parser.add_argument("--direction", choices=["up", "down"], default="up", help="direction of 'plan'")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    parser.add_argument("--reason", default=None, help="why: recorded in the migration log (required by up, down and "
                        "resolve, unless --dry-run)")
    parser.add_argument("--acknowledge-drift", metavar="REASON",
                        help="accept applied files whose checksum changed, recording REASON")
    parser.add_argument("--version", type=int, help="resolve: the dirty version")
    parser.add_argument("--as", dest="outcome", choices=["applied", "reverted"], help="resolve: what it really is")
    parser.add_argument("--no-lint", action="store_true", help="skip squawk (not recommended)")
    return parser


def changes_schema(args: argparse.Namespace) -> bool:
    """Say whether the command writes to a database: every action but plan, status and a dry run does."""
    return args.action not in READ_ONLY_ACTIONS and not (args.dry_run and args.action in {"up", "down"})


def engine_for(service, catalog) -> MigrationEngine:
    variable = f"OMNI_PG_DSN_{service.env_suffix}"
    dsn = os.environ.get(variable)
    if not dsn:
        raise InvalidMigrationInput(f"{variable} is not set: export the DSN of {service.name}'s database "
                                    f"(locally: . .devstack/env)")
    return MigrationEngine(
        service=service.name,
        migrations_dir=catalog.migrations_dir(service.name),
        connect=lambda: psycopg2.connect(dsn, connect_timeout=10),
        settings=EngineSettings.from_catalog(service.migrations),
        applied_by=f"cli:{getpass.getuser()}@{socket.gethostname()}",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        catalog = load_catalog()
        services = catalog.release_order() if args.service == "all" else [catalog.get(args.service)]
        direction = args.direction if args.action == "plan" else args.action
        if args.action in {"down"} or (args.action == "plan" and direction == "down"):
            services = list(reversed(services))
        if args.action == "resolve" and (args.version is None or not args.outcome or not args.reason):
            raise InvalidMigrationInput("resolve needs --version N, --as applied|reverted and --reason '...'")
        if changes_schema(args) and not (args.reason or "").strip():
            dry_run_hint = ", or --dry-run to see the plan" if args.action in {"up", "down"} else ""
            raise InvalidMigrationInput(f"{args.action} changes the schema: give --reason '...' (why; it is kept in "
                                        f"the migration log){dry_run_hint}. Nothing was changed.")
        for service in services:
            engine = engine_for(service, catalog)
            if args.action == "status":
                print(engine.status().render())
            elif args.action == "resolve":
                engine.resolve(args.version, args.outcome, args.reason)
            elif args.action == "plan":
                plan = engine.plan(direction, args.target, run_lint=not args.no_lint)
                print(plan.render())
                if plan.blocking:
                    return EXIT_BAD_INPUT
            else:
                result = engine.migrate(direction, args.target, dry_run=args.dry_run, reason=args.reason,
                                        acknowledge_drift=args.acknowledge_drift, run_lint=not args.no_lint)
                print(result.summary())
    except (CatalogError, InvalidMigrationInput) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MigrationError, psycopg2.Error) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
