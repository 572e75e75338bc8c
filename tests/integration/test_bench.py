"""`make bench` must keep working: each benchmark runs end to end at a tiny size and prints its figures.

Its figures are not asserted (timings belong in bench/, not in tests); a release bench that waited for the next
maintenance window, once the window param came, went unnoticed until these ran.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("bench", "arguments", "says"), [
    ("dag_parse", ["--services", "3", "--rounds", "1"], "DAG parse, catalog of 3 services (9 DAGs)"),
    ("migrations", ["--migrations", "5", "--rounds", "1"], "5 migrations: engine"),
    ("release", ["--rows", "2000", "--rounds", "1"], "whole release with trivial work"),
    ("data_migration", ["--sizes", "2000", "--offset-budget", "5"], "2,000 rows: engine"),
])
def test_each_benchmark_runs_at_a_tiny_size(bench, arguments, says):
    result = subprocess.run([sys.executable, "-c", f"from bench import {bench}; {bench}.main({arguments!r})"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert says in result.stdout, result.stdout[-2000:]
