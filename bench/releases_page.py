"""The Releases page (#18) at 50 services with 100 releases each, beside Airflow's own DAG runs list for the same data.

A metadata database of its own (SQLite, as `airflow standalone` makes; `airflow db migrate`), the project's DAGs
serialized into it for a catalog grown to N services, then N x R release runs written as the release DAG writes them:
a run, its task instances, and its report (with a bake of ``--minutes`` readings), mostly released, every fifth rolled
back. Both sides are answered by one API server app in this process (Airflow's, with the plugin), as the admin:

- the history (the last 10 releases of every service, with their tasks and reports) beside the same 500 runs read
  from `GET /api/v2/dags/{dag_id}/dagRuns?limit=10`, one DAG at a time as Airflow's own pages show them;
- the page (overview, calendar for 4 weeks, history) beside the same;
- one service's 100 releases beside `dagRuns?limit=100` of that DAG;
- a bake as JSON beside `GET .../dagRuns/{run_id}`, and its chart, drawn (the first look) and from the cache.

Medians of ``--rounds`` after a warm-up, candidate and baseline alternating. It checks that the page wrote nothing:
the rows and the last update of each table it reads are the same after the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HISTORY = 10  # the page's last releases per service (ui/app.py HISTORY_LIMIT)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench releases_page", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--releases", type=int, default=100, help="release runs per service")
    parser.add_argument("--minutes", type=int, default=30, help="readings in each release's bake")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    for name in ("services", "releases", "minutes", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


# ---- in the measuring interpreter: the data ---------------------------------------------------------------------------
def report(service: str, run_id: str, i: int, rolled_back: bool, minutes: int, t0: Any) -> dict[str, Any]:
    """A report as the report task returns it, with a bake as the monitoring gate records it."""
    from datetime import timedelta

    readings = [{"minute": (t0 + timedelta(minutes=m)).isoformat(), "error_rate": 0.002 + (0.2 if rolled_back and
                 m == minutes - 1 else 0), "p99_ms": 150.0 + m, "requests": 600} for m in range(minutes)]
    ended = t0 + timedelta(minutes=minutes - 1, seconds=30)
    outcome = "rolled_back" if rolled_back else "released"
    return {"dag_id": f"release_{service}", "run_id": run_id, "service": service, "outcome": outcome,
            "summary": outcome, "triggered_by": "bench", "reason": f"bench release {i}",
            "before": {"image": f"omni/{service}:1.{i}", "schema_version": i},
            "target": {"image": f"omni/{service}:1.{i + 1}", "image_digest": f"sha256:{i:064x}",
                       "schema_version": i + 1},
            "after": {"image": f"omni/{service}:1.{i if rolled_back else i + 1}",
                      "schema_version": i if rolled_back else i + 1},
            "stages": [{"stage": "backup", "state": "success", "seconds": 12.0},
                       {"stage": "monitoring_gate", "state": "failed" if rolled_back else "success",
                        "seconds": 60.0 * minutes}],
            "approval": {"approved_by": "release-manager", "approved_at": t0.isoformat()},
            "bake": {"started_at": t0.isoformat(), "ended_at": ended.isoformat(),
                     "thresholds": {"max_error_rate": 0.01, "max_p99_latency_ms": 800, "missing_data_minutes": 3.0},
                     "readings": readings, "failed_at": ended.isoformat() if rolled_back else None,
                     "verdict": "failed" if rolled_back else "passed",
                     "reason": "5xx error rate above the 1.00% threshold" if rolled_back else None, "steps": []}}


def fill(services: list[str], releases: int, minutes: int) -> dict[str, int]:
    """Write ``releases`` runs of each service's release DAG, with task instances and reports; return row counts."""
    import uuid
    from datetime import datetime, timedelta, timezone

    from airflow.models.dag_version import DagVersion
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import insert, select

    from omnisphere_release.contracts import MAIN_STAGES, RELEASE_FAILED, REPORT, ROLLBACK_STAGES

    tasks = (*MAIN_STAGES, *ROLLBACK_STAGES, RELEASE_FAILED, REPORT)
    start = datetime.now(timezone.utc) - timedelta(days=releases)
    counts = {"runs": 0, "task_instances": 0, "reports": 0}
    for service in services:
        with create_session(scoped=False) as session:  # one transaction per service
            dag_id = f"release_{service}"
            version = session.scalar(select(DagVersion).where(DagVersion.dag_id == dag_id)
                                     .order_by(DagVersion.version_number.desc()).limit(1))
            assert version is not None, f"{dag_id} was not serialized"
            runs, tis, xcoms = [], [], []
            for i in range(releases):
                at = start + timedelta(days=i)
                rolled_back = i % 5 == 4
                run_id = f"manual__{at.isoformat()}"
                runs.append({"dag_id": dag_id, "run_id": run_id, "run_type": "manual", "run_after": at,
                             "start_date": at, "end_date": at + timedelta(minutes=minutes + 5),
                             "state": "failed" if rolled_back else "success", "triggering_user_name": "bench",
                             "conf": {"image_tag": f"1.{i + 1}", "reason": f"bench release {i}"},
                             "created_dag_version_id": version.id, "clear_number": 0})
            session.execute(insert(DagRun), runs)
            ids = dict(session.execute(select(DagRun.run_id, DagRun.id).where(DagRun.dag_id == dag_id)).all())
            for i, run in enumerate(runs):
                rolled_back = run["state"] == "failed"
                for task_id in tasks:
                    rollback = task_id in ROLLBACK_STAGES or task_id == RELEASE_FAILED
                    state = ("failed" if task_id == "monitoring_gate" else "success" if rollback
                             or task_id != "finalize" else "upstream_failed") if rolled_back else (
                        "skipped" if rollback else "success")
                    tis.append({"id": uuid.uuid4(), "dag_id": dag_id, "run_id": run["run_id"], "task_id": task_id,
                                "map_index": -1, "state": state, "try_number": 1, "max_tries": 1, "duration": 5.0,
                                "start_date": run["start_date"], "end_date": run["end_date"], "pool": "default_pool",
                                "pool_slots": 1, "queue": "default", "priority_weight": 1,
                                "dag_version_id": version.id})
                xcoms.append({"dag_run_id": ids[run["run_id"]], "task_id": REPORT, "map_index": -1,
                              "key": "return_value", "dag_id": dag_id, "run_id": run["run_id"],
                              "value": report(service, run["run_id"], i, rolled_back, minutes, run["start_date"]),
                              "timestamp": run["end_date"]})
            session.execute(insert(TaskInstance), tis)
            session.execute(insert(XComModel), xcoms)
            counts["runs"] += len(runs)
            counts["task_instances"] += len(tis)
            counts["reports"] += len(xcoms)
    return counts


def fingerprint() -> dict[str, Any]:
    """What the page reads, summed up: a write anywhere would change it."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.variable import Variable
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session(scoped=False) as session:
        return {
            "dag_run": list(session.execute(select(func.count(), func.max(DagRun.updated_at))).one()),
            "task_instance": list(session.execute(select(func.count(), func.max(TaskInstance.updated_at))).one()),
            "xcom": list(session.execute(select(func.count(), func.max(XComModel.timestamp))).one()),
            "variable": session.scalar(select(func.count()).select_from(Variable)),
        }


def timed(client: Any, path: str, headers: dict[str, str], **params: Any) -> float:
    t0 = time.perf_counter()
    response = client.get(path, headers=headers, params=params)
    elapsed = time.perf_counter() - t0
    assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text[:500]}"
    return elapsed


def measure(home: str, services: int, releases: int, minutes: int, rounds: int) -> dict[str, Any]:
    """In an interpreter whose Airflow is configured for the bench's home: fill, then time both sides."""
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from fastapi.testclient import TestClient

    from omnisphere_release.catalog import load_catalog

    t0 = time.perf_counter()
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    DagBundlesManager().sync_bundles_to_db()  # the dags-folder bundle the DAGs belong to, as the DAG processor does
    sync_bag_to_db(bag, "dags-folder", None)
    names = load_catalog().names
    counts = fill(names, releases, minutes)
    setup_s = time.perf_counter() - t0
    client = TestClient(create_app("core"))
    headers = {"Authorization": "Bearer " + get_auth_manager().generate_jwt(
        SimpleAuthManagerUser(username="admin", role="admin"))}
    dags = [f"release_{s}" for s in names]
    first_service, first_dag = names[0], dags[0]
    runs = client.get(f"/api/v2/dags/{first_dag}/dagRuns", headers=headers,
                      params={"limit": 10, "order_by": "-run_after"}).json()["dag_runs"]
    run_id = next((r for r in runs if r["state"] == "failed"), runs[0])["dag_run_id"]  # a failed bake, if any
    bake_params = {"dag_id": first_dag, "run_id": run_id}

    def airflow_history() -> float:  # the same runs, from Airflow's list, one DAG at a time
        return sum(timed(client, f"/api/v2/dags/{d}/dagRuns", headers, limit=HISTORY, order_by="-run_after")
                   for d in dags)

    cases: dict[str, tuple[Any, Any]] = {
        "history": (lambda: timed(client, "/omnisphere/api/releases", headers), airflow_history),
        "page": (lambda: timed(client, "/omnisphere/releases", headers), airflow_history),
        "one_service": (lambda: timed(client, "/omnisphere/api/releases", headers, service=first_service,
                                      limit=releases),
                        lambda: timed(client, f"/api/v2/dags/{first_dag}/dagRuns", headers,
                                      limit=min(releases, 100), order_by="-run_after")),
        "bake_json": (lambda: timed(client, "/omnisphere/api/bake", headers, **bake_params),
                      lambda: timed(client, f"/api/v2/dags/{first_dag}/dagRuns/{run_id}", headers)),
        "bake_chart_cached": (lambda: timed(client, "/omnisphere/api/bake.svg", headers, **bake_params),
                              lambda: timed(client, f"/api/v2/dags/{first_dag}/dagRuns/{run_id}", headers)),
    }
    before = fingerprint()
    # The first chart of a run is drawn (the bake's first look); later ones come from the cache.
    chart_first_s = timed(client, "/omnisphere/api/bake.svg", headers, **bake_params, tz="Europe/Paris")
    chart_drawn_s = timed(client, "/omnisphere/api/bake.svg", headers, **bake_params, tz="Asia/Tokyo")
    figures: dict[str, Any] = {"services": len(names), "releases_per_service": releases, "minutes": minutes,
                               "rounds": rounds, "setup_s": setup_s, **counts, "chart_first_s": chart_first_s,
                               "chart_drawn_s": chart_drawn_s}
    for name, (ours, theirs) in cases.items():
        ours(), theirs()  # warm-up: imports, the first query plans, the chart's first drawing
        mine, base = [], []
        for _ in range(rounds):
            mine.append(ours())
            base.append(theirs())
        figures[name] = {"ours_s": statistics.median(mine), "airflow_s": statistics.median(base)}
        figures[name]["ratio"] = figures[name]["ours_s"] / figures[name]["airflow_s"]
    figures["changed_nothing"] = fingerprint() == before
    return figures


# ---- the parent: a home of its own, then the measuring interpreter ---------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from bench.dag_parse import grow_catalog

    with tempfile.TemporaryDirectory(prefix="omni-bench-releases-page-") as tmp:
        folder = Path(tmp)
        catalog, sql_dir = grow_catalog(folder, args.services)
        # The calendar shows release_all's windows too: the real catalog's.
        import yaml

        document = yaml.safe_load(catalog.read_text())
        real = yaml.safe_load((REPO / "include" / "services.yaml").read_text())
        document = {**{k: v for k, v in real.items() if k != "services"}, "services": document["services"]}
        catalog.write_text(yaml.safe_dump(document, sort_keys=False))
        home = folder / "airflow"
        env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
               "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
               "AIRFLOW__CORE__AUTH_MANAGER":
                   "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
               "OMNISPHERE_CATALOG": str(catalog), "OMNISPHERE_SQL_DIR": str(sql_dir),
               "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO)])}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True,
                       timeout=600)
        migrate_s = time.perf_counter() - t0
        code = (f"import json; from bench.releases_page import measure; print('FIGURES ' + json.dumps(measure("
                f"{str(home)!r}, {args.services}, {args.releases}, {args.minutes}, {args.rounds}), default=str))")
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600,
                                cwd=REPO, check=False)
        if result.returncode != 0:
            # The traceback, each line cut short: SQLAlchemy's errors carry every parameter of the statement.
            trace = result.stderr[result.stderr.rfind("Traceback"):]
            raise SystemExit(f"the measuring interpreter failed (exit {result.returncode}):\n"
                             + "\n".join(line[:400] for line in trace.splitlines()[-60:]))
        line = next(x for x in result.stdout.splitlines() if x.startswith("FIGURES "))
        figures: dict[str, Any] = json.loads(line.removeprefix("FIGURES "))
    figures["migrate_s"] = migrate_s
    report_figures(figures)
    return figures


def report_figures(f: dict[str, Any]) -> None:
    ms = 1000
    n, r = f["services"], f["releases_per_service"]
    print(f"Releases page, {n} services x {r} releases ({f['runs']:,} runs, {f['task_instances']:,} task instances, "
          f"{f['reports']:,} reports with a {f['minutes']}-minute bake; SQLite metadata, in-process API server, "
          f"median of {f['rounds']}; set up in {f['migrate_s'] + f['setup_s']:.0f} s):")
    shown = min(HISTORY, r)
    rows = [
        ("history", f"history: last {shown} of each service ({n * shown} releases, tasks, reports, bakes)",
         f"Airflow's dagRuns?limit={HISTORY}, {n} DAGs one at a time (runs alone)"),
        ("page", "the page: overview + 4-week calendar + that history, as HTML",
         f"the same {n} dagRuns lists"),
        ("one_service", f"one service's {r} releases", f"Airflow's dagRuns?limit={min(r, 100)} of that DAG"),
        ("bake_json", "a release's bake as JSON", "Airflow's GET of that one run"),
        ("bake_chart_cached", "its chart, SVG, looked at again (cached)", "Airflow's GET of that one run"),
    ]
    for key, ours, theirs in rows:
        x = f[key]
        print(f"  {ours}: {x['ours_s'] * ms:.0f} ms vs {theirs}: {x['airflow_s'] * ms:.0f} ms; "
              f"ratio {x['ratio']:.2f}x")
    print(f"  a chart drawn (matplotlib, a bake of {f['minutes']} minutes, not cached): {f['chart_drawn_s'] * ms:.0f} ms; "
          f"a first chart asked for before any page (whose answer imports matplotlib after it is sent): "
          f"{f['chart_first_s'] * ms:.0f} ms")
    print(f"  wrote nothing to the metadata database: {'yes' if f['changed_nothing'] else 'NO: it changed'}")


if __name__ == "__main__":
    main()
