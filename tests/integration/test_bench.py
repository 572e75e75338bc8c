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
    ("dag_parse", ["--services", "3", "--rounds", "1"], "DAG parse, catalog of 3 services (12 DAGs)"),
    ("migrations", ["--migrations", "5", "--rounds", "1"], "5 migrations: engine"),
    # a whole release through the devstack (~80 s): in `make test-long`
    pytest.param("release", ["--rows", "2000", "--rounds", "1"], "whole release with trivial work",
                 marks=pytest.mark.long),
    ("data_migration", ["--sizes", "2000", "--offset-budget", "5"], "2,000 rows: engine"),
    ("releases_page", ["--services", "2", "--releases", "5", "--minutes", "3", "--rounds", "1"],
     "wrote nothing to the metadata database: yes"),
])
def test_each_benchmark_runs_at_a_tiny_size(bench, arguments, says):
    result = subprocess.run([sys.executable, "-c", f"from bench import {bench}; {bench}.main({arguments!r})"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert says in result.stdout, result.stdout[-2000:]


# release_train takes ~15 minutes (a devstack of 20 services, the Celery topology, then airflow standalone): these
# check its wiring cheaply, and the helpers its figures come from, without a run.
def test_the_release_train_catalog_is_a_valid_catalog_of_independent_services_with_no_bake(tmp_path):
    from bench.release_train import generate_catalog
    from omnisphere_release.catalog import load_catalog

    path, sql_dir = generate_catalog(tmp_path, 7, max_parallel=3)
    catalog = load_catalog(path, sql_dir)
    assert len(catalog.services) == 7 and catalog.release_train.max_parallel == 3
    assert catalog.release_all_window is None  # no scheduled release_all run beside the bench's own
    assert all(s.depends_on == () and s.deploy.bake_minutes == 0 for s in catalog.services)
    # The devstack writes one connection per service: no two services share one.
    assert len({s.postgres_conn_id for s in catalog.services}) == len({s.http_conn_id for s in catalog.services}) == 7
    assert [s.name for s in catalog.release_order()] == [s.name for s in catalog.services]


def test_the_release_train_arguments_and_their_bounds(capsys):
    from bench.release_train import DEFAULT_WORKER_CONCURRENCY, parse_args

    args = parse_args([])
    assert (args.services, args.max_parallel, args.worker_concurrency, args.no_standalone) == (
        20, 10, DEFAULT_WORKER_CONCURRENCY, False)
    assert parse_args(["--services", "4", "--max-parallel", "2", "--no-standalone"]).no_standalone
    for bad in (["--max-parallel", "0"], ["--max-parallel", "51"], ["--services", "0"], ["--services", "many"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad)
        assert exit_.value.code == 2
    assert "--max-parallel must be from 1 to 50" in capsys.readouterr().err


def test_the_figures_come_from_the_runs_own_dates():
    from bench.release_train import most_at_once, seconds

    def run(start: str, end: str) -> dict:
        return {"queued_at": "2026-01-01T10:00:00Z", "start_date": f"2026-01-01T10:{start}Z",
                "end_date": f"2026-01-01T10:{end}Z"}

    assert seconds(run("00:05", "01:05")) == 60 and seconds(run("00:05", "01:05"), "queued_at") == 65
    # Two waves: three at once, then (one ending as the next starts) never four.
    runs = [run("00:00", "01:00"), run("00:10", "01:00"), run("00:20", "00:50"), run("01:00", "02:00")]
    assert most_at_once(runs) == 3


def test_the_task_parse_cost_is_read_from_the_task_logs(tmp_path):
    from bench.release_train import parse_costs

    task_log = tmp_path / "dag_id=release_all" / "run_id=r" / "task_id=check_manifest" / "attempt=1.log"
    task_log.parent.mkdir(parents=True)
    task_log.write_text('{"event": "Filling up the DagBag"}\n'
                        '{"event": "Worker startup parse complete", "dag_file_parse_ms": 900}\nnot json\n'
                        '{"event": "Worker startup parse complete", "dag_file_parse_ms": 3100}\n')
    assert parse_costs(tmp_path) == {"parses": 2, "median_s": 2.0, "max_s": 3.1, "total_s": 4.0}
    assert parse_costs(tmp_path / "none")["parses"] == 0


def test_python_m_bench_runs_all_or_the_named_benchmarks_and_refuses_what_it_does_not_know(capsys):
    from bench.__main__ import BENCHMARKS, parse_args

    assert parse_args([]) == (list(BENCHMARKS), [])
    assert "release_train" in BENCHMARKS
    assert parse_args(["release_train", "--services", "5"]) == (["release_train"], ["--services", "5"])
    for bad, says in ((["release_trains"], "unknown benchmark release_trains"),
                      (["dag_parse", "release", "--rounds", "1"], "name exactly one"),
                      (["--services", "5"], "name exactly one")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad)
        assert exit_.value.code == 2
        assert says in capsys.readouterr().err
