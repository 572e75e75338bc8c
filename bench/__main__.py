"""`make bench`: run every benchmark and print its figures; `python -m bench NAME...` runs just those.

A single benchmark takes its own options after its name, e.g. `python -m bench release_train --services 5`
(`python -m bench release_train --help` lists them).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# In the order `make bench` runs them; release_train (the Celery topology, 10-20 minutes on 2 cores) comes last.
BENCHMARKS = ("dag_parse", "migrations", "release", "data_migration", "releases_page", "release_train")


def parse_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Return the benchmarks to run and the options for the one named (options need exactly one name)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    # Everything after the first name that starts with '-' belongs to that benchmark.
    first_option = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, options = argv[:first_option], argv[first_option:]
    if options and options[0] in ("-h", "--help") and not names:
        parser.parse_args(options)  # prints the usage and exits 0
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if options and len(names) != 1:
        parser.error(f"options ({' '.join(options)}) go to one benchmark: name exactly one before them, e.g. "
                     f"`python -m bench release_train --services 5`")
    return names or list(BENCHMARKS), options


def main(argv: list[str] | None = None) -> int:
    names, options = parse_args(sys.argv[1:] if argv is None else argv)
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"== {module.__name__} ==", flush=True)
        module.main(options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
