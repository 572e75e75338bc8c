"""`make bench`: run every benchmark and print its figures."""

from __future__ import annotations

import sys

from bench import dag_parse, data_migration, migrations, release


def main() -> int:
    for module in (dag_parse, migrations, release, data_migration):
        print(f"== {module.__name__} ==", flush=True)
        module.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
