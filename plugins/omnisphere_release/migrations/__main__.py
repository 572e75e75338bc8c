"""Command line: ``omni-migrate <service|all> <action> ...`` (``python -m omnisphere_release.migrations``).

The replacement of ``run-migrations.sh <service|all> <up|down>``. The database of service ``auth-service`` is read from
``OMNI_PG_DSN_AUTH_SERVICE`` (never from the command line, where every user of the machine could read it).

actions:
  plan      [--direction up|down] [--to V]  what would run: files, SQL, lint findings; changes nothing
  status                                    version (none: nothing applied), pending files, dirty, drift, baseline
  up        [--to V]                        apply pending files up to V (default: all)
  down      [--to V | --all]                revert every version above V, keeping V (default: the newest one only);
                                            --all reverts everything, version 0 included
  resolve   --version V --as applied|reverted   settle a version left dirty by an interrupted no-transaction file
  baseline  --version V                     record versions <= V as applied without running them: adopt a database
                                            another tool built (the files' checksums are recorded)
  adopt     [--table schema_migrations]     baseline at the version in golang-migrate's table (refused if dirty);
                                            golang-migrate's table is left as it is
  new NAME                                  create the next NNN_NAME.up.sql / .down.sql from the template
A change (up, down, resolve, baseline, adopt) needs --reason, kept in the migration log; plan, status, new and
--dry-run need none. baseline, adopt and new take one service, not all.

A change also takes the service's lease (one operation per service at a time, as every Airflow release, rollback and
migration does) and gives it up when it ends, also on an error or Ctrl-C; with `all`, each service's in turn. It is
refused, exit 2, while an Airflow run or another command holds the service (the message names it). The lease is held
by this command's PostgreSQL session: a killed command's lease ends with it. An Airflow run's lease that has ended
is taken over when this command can ask Airflow: OMNI_AIRFLOW_URL and credentials, as for omni-release, or on an
Airflow host (AIRFLOW_HOME set, as `. .devstack/env` does) its metadata database.

A down below the baseline (versions that baseline/adopt recorded without running them) is refused: their down files
never ran against this database. --below-baseline REASON reverts them anyway, on record.

exit codes:
  0  done (also: nothing to do)
  1  failed while running: the failed migration was rolled back, or its version is dirty (see status)
  2  bad input or refused, nothing changed: unknown service, bad target, blocking lint finding, drift, a history that
     disagrees with baseline/adopt, a dirty golang-migrate version, a missing --reason, a down below the
     baseline, the service held by a release or another command
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import psycopg2

from omnisphere_release.catalog import CatalogError, load_catalog
from omnisphere_release.locks import ServiceBusy, airflow_run_is_over_from_env, cli_lease
from omnisphere_release.migrations.engine import GOLANG_MIGRATE_TABLE, NOTHING_APPLIED, EngineSettings, MigrationEngine
from omnisphere_release.migrations.errors import InvalidMigrationInput, MigrationError
from omnisphere_release.migrations.files import new_migration

EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
ACTIONS = ["up", "down", "status", "plan", "resolve", "baseline", "adopt", "new"]
READ_ONLY_ACTIONS = {"plan", "status", "new"}  # new writes files, not the database
ONE_SERVICE_ACTIONS = {"baseline", "adopt", "new"}
DRY_RUN_ACTIONS = {"up", "down", "baseline", "adopt"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-migrate",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("service", help="a catalog service name, or 'all' (in depends_on order; down in reverse)")
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("name", nargs="?", help="new: the migration's name, lower_snake_case (e.g. add_users_email)")
    parser.add_argument("--to", type=int, dest="target", help="target version (up: apply up to it; down: revert "
                        "every version above it and keep it; default: up to the latest, down by one)")
    parser.add_argument("--all", action="store_true", dest="all_versions",
                        help="down: revert every applied version, version 0 included")
    parser.add_argument("--direction", choices=["up", "down"], default="up", help="direction of 'plan'")
    parser.add_argument("--dry-run", action="store_true", help="up, down, baseline, adopt: print what would be done and change nothing")
    parser.add_argument("--reason", default=None, help="why: recorded in the migration log (required by up, down, "
                        "resolve, baseline and adopt, unless --dry-run)")
    parser.add_argument("--acknowledge-drift", metavar="REASON",
                        help="accept applied files whose checksum changed, recording REASON")
    parser.add_argument("--version", type=int, help="resolve: the dirty version; baseline: the version the database "
                        "is at (every file up to it is recorded as applied)")
    parser.add_argument("--table", default=GOLANG_MIGRATE_TABLE,
                        help="adopt: golang-migrate's table (its x-migrations-table), default %(default)s")
    parser.add_argument("--as", dest="outcome", choices=["applied", "reverted"], help="resolve: what it really is")
    parser.add_argument("--no-lint", action="store_true", help="skip squawk (not recommended)")
    parser.add_argument("--below-baseline", metavar="REASON",
                        help="down, plan --direction down: also revert versions baseline/adopt recorded without "
                             "running them, recording REASON (say how you know their down files undo what the other "
                             "tool applied); refused without it")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse arguments that do not fit the action, before anything is read or changed."""
    if args.action in ONE_SERVICE_ACTIONS and args.service == "all":
        raise InvalidMigrationInput(f"{args.action} takes one service, not 'all': versions are numbered per service")
    if args.action == "new" and not args.name:
        raise InvalidMigrationInput("new needs the migration's name: `new add_users_email`")
    if args.action != "new" and args.name:
        raise InvalidMigrationInput(f"unexpected argument {args.name!r}: only `new` takes a name")
    if args.action == "resolve" and (args.version is None or not args.outcome or not args.reason):
        raise InvalidMigrationInput("resolve needs --version N, --as applied|reverted and --reason '...'")
    if args.action == "baseline" and args.version is None:
        raise InvalidMigrationInput("baseline needs --version N: the newest version the database already has "
                                    "(every file up to it is recorded as applied, none is run)")
    downward = args.action == "down" or (args.action == "plan" and args.direction == "down")
    if args.all_versions and (not downward or args.target is not None):
        raise InvalidMigrationInput("--all goes with down alone, without --to: it reverts every applied version")
    if args.below_baseline is not None and (not downward or not args.below_baseline.strip()):
        raise InvalidMigrationInput("--below-baseline goes with down (or plan --direction down) and needs a reason: "
                                    "how you know the down files undo what the other tool applied")


def changes_schema(args: argparse.Namespace) -> bool:
    """Say whether the command writes to a database: every action but plan, status and a dry run does."""
    return args.action not in READ_ONLY_ACTIONS and not (args.dry_run and args.action in DRY_RUN_ACTIONS)


def connect_to(service) -> Callable[[], Any]:
    """Return how to connect to ``service``'s database, from ``OMNI_PG_DSN_<SERVICE>``."""
    variable = f"OMNI_PG_DSN_{service.env_suffix}"
    dsn = os.environ.get(variable)
    if not dsn:
        raise InvalidMigrationInput(f"{variable} is not set: export the DSN of {service.name}'s database "
                                    f"(locally: . .devstack/env)")
    return lambda: psycopg2.connect(dsn, connect_timeout=10)


def engine_for(service, catalog) -> MigrationEngine:
    return MigrationEngine(
        service=service.name,
        migrations_dir=catalog.migrations_dir(service.name),
        connect=connect_to(service),
        settings=EngineSettings.from_catalog(service.migrations),
        applied_by=f"cli:{getpass.getuser()}@{socket.gethostname()}",
    )


def run_action(args: argparse.Namespace, engine: MigrationEngine, direction: str, target: int | None) -> int:
    """Run one service's part of the command; return its exit code."""
    if args.action == "status":
        print(engine.status().render())
    elif args.action == "resolve":
        engine.resolve(args.version, args.outcome, args.reason)
    elif args.action == "baseline":
        print(engine.baseline(args.version, args.reason or "", dry_run=args.dry_run).summary())
    elif args.action == "adopt":
        print(engine.adopt(args.reason or "", table=args.table, dry_run=args.dry_run).summary())
    elif args.action == "plan":
        plan = engine.plan(direction, target, run_lint=not args.no_lint, below_baseline=args.below_baseline)
        print(plan.render())
        if plan.blocking:
            return EXIT_BAD_INPUT
    else:
        result = engine.migrate(direction, target, dry_run=args.dry_run, reason=args.reason,
                                acknowledge_drift=args.acknowledge_drift, run_lint=not args.no_lint,
                                below_baseline=args.below_baseline)
        print(result.summary())
    return EXIT_DONE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        catalog = load_catalog()
        check_arguments(args)
        services = catalog.release_order() if args.service == "all" else [catalog.get(args.service)]
        direction = args.direction if args.action == "plan" else args.action
        if args.action in {"down"} or (args.action == "plan" and direction == "down"):
            services = list(reversed(services))
        if args.action == "new":
            up, down = new_migration(catalog.migrations_dir(services[0].name), args.name)
            print(f"{services[0].name}: created {up} and {down}; write the SQL of both, then `plan` shows it")
            return EXIT_DONE
        if changes_schema(args) and not (args.reason or "").strip():
            dry_run_hint = ", or --dry-run to see the plan" if args.action in DRY_RUN_ACTIONS else ""
            raise InvalidMigrationInput(f"{args.action} changes the schema: give --reason '...' (why; it is kept in "
                                        f"the migration log){dry_run_hint}. Nothing was changed.")
        target = NOTHING_APPLIED if args.all_versions else args.target
        done: list[str] = []
        for service in services:
            engine = engine_for(service, catalog)
            if not changes_schema(args):
                code = run_action(args, engine, direction, target)
            else:
                # The lease around this service's work alone: with `all`, a service is free again as soon as its
                # part is done, and a held service stops the command before anything of it changes.
                operation = f"omni-migrate {service.name} {args.action}: {args.reason.strip()}"[:200]
                try:
                    with cli_lease(service.name, connect_to(service), "omni-migrate", args.action, operation,
                                   airflow_run_is_over_from_env):
                        code = run_action(args, engine, direction, target)
                except ServiceBusy as exc:
                    finished = f" ({', '.join(done)} done before it)" if done else ""
                    raise InvalidMigrationInput(f"{exc} Nothing of {service.name} was changed{finished}.") from None
            if code != EXIT_DONE:
                return code
            done.append(service.name)
    except (CatalogError, InvalidMigrationInput) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MigrationError, psycopg2.Error) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted: each migration that committed stays, the one running was rolled back (or, if it ran "
              "outside a transaction, is marked dirty), and the service's lease was given up; `status` shows where "
              "it stopped", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
