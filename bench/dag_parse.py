"""DAG parse time with the catalog grown to N services, beside the parse time of an empty DAG file in the same run.

The DAG processor re-parses dags/ every few seconds, so its cost grows with the catalog. Each measurement runs in a
fresh interpreter (as the DAG processor's parsing does), alternating candidate and baseline to share the machine's
noise, and reports medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

EMPTY_DAG = '''"""An empty Airflow DAG file: the baseline."""
from airflow.sdk import DAG

with DAG(dag_id="empty", schedule=None, tags=["bench"]):
    pass
'''

MEASURE = r'''
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
t0 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "dags": len(bag.dags), "errors": len(bag.import_errors)}))
'''


def grow_catalog(folder: Path, services: int) -> tuple[Path, Path]:
    """Write a catalog of ``services`` entries (copies of the real ones) and their SQL folders."""
    base = yaml.safe_load((REPO / "include" / "services.yaml").read_text())["services"]
    entries: list[dict] = []
    sql_dir = folder / "sql"
    for i in range(services):
        template = base[i % len(base)]
        name = f"{template['name'].removesuffix('-service')}-{i:03d}-service"
        entry = json.loads(json.dumps(template))
        entry.update(name=name, postgres_conn_id=f"omni_pg_{i}", http_conn_id=f"omni_http_{i}",
                     depends_on=[entries[i - 1]["name"]] if i % 5 and entries else [])
        entry["ecs"]["service"] = name
        entry["monitoring"]["target_group"] = f"targetgroup/{name}/{i:016x}"
        entries.append(entry)
        shutil.copytree(REPO / "include" / "sql" / template["name"], sql_dir / name)
    catalog = folder / "services.yaml"
    catalog.write_text(yaml.safe_dump({"services": entries}, sort_keys=False))
    return catalog, sql_dir


def measure(dag_folder: Path, env: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(dag_folder)], capture_output=True, text=True,
                            env=env, check=True, timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="omni-bench-parse-") as tmp:
        folder = Path(tmp)
        catalog, sql_dir = grow_catalog(folder, args.services)
        empty_dir = folder / "empty_dags"
        empty_dir.mkdir()
        (empty_dir / "empty_dag.py").write_text(EMPTY_DAG)
        env = {**os.environ, "AIRFLOW_HOME": str(folder / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "OMNISPHERE_CATALOG": str(catalog), "OMNISPHERE_SQL_DIR": str(sql_dir),
               "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO)])}
        project, baseline = [], []
        for _ in range(args.rounds):
            run = measure(REPO / "dags", env)
            assert run["errors"] == 0, "the project's DAGs failed to parse with the grown catalog"
            project.append(run["seconds"])
            baseline.append(measure(empty_dir, env)["seconds"])
        figures = {
            "services": args.services,
            "dags": run["dags"],
            "project_parse_s": statistics.median(project),
            "empty_dag_parse_s": statistics.median(baseline),
        }
        figures["ratio"] = figures["project_parse_s"] / figures["empty_dag_parse_s"]
    print(f"DAG parse, catalog of {figures['services']} services ({figures['dags']} DAGs): "
          f"{figures['project_parse_s'] * 1000:.0f} ms median of {args.rounds}; empty DAG file: "
          f"{figures['empty_dag_parse_s'] * 1000:.0f} ms; ratio {figures['ratio']:.1f}x "
          f"({figures['project_parse_s'] * 1000 / figures['dags']:.1f} ms per DAG, "
          f"{figures['project_parse_s'] / figures['dags'] / figures['empty_dag_parse_s']:.1f}x the empty file's one DAG)")
    return figures


if __name__ == "__main__":
    main()
