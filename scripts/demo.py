"""`make demo`: the main job on the local stack, end to end, with a summary a person can read.

1. schema_migrations for every service: a dry run (the plan, changing nothing), then the real run in depends_on order.
2. release_auth-service to a good image in staging: backup, schema_up, integrity_check, ecs_deploy, smoke_test,
   monitoring_gate; its report is kept as evidence (service, environment, image digest, migration checksums).
3. release_auth-service to an image whose 5xx rate breaks the monitoring gate: the release rolls back on its own
   (ECS to the previous revision, schema down) and the run ends FAILED, as it must.
4. Promotion to production: the failed image is refused by preflight (no successful staging release of it), nothing
   changed; the good one is released to production, by the same digest, and preflight names its staging evidence.

The demo runs with a copy of the catalog in which auth-service's maintenance window is always open (the production
releases wait for it like any release, and carry no evidence_override) and production needs no approver
(dag.test() has no second person; `make up` shows approve_release in the UI).

Airflow's own output goes to a log file; the summary says where.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

from devstack import stack  # noqa: E402
from devstack.dag_test import dag_processor  # noqa: E402

SERVICES = ("auth-service", "billing-service", "notification-service")
STEPS = 8


def demo_catalog(folder: Path) -> Path:
    """Write the demo's catalog (see the module's docstring) into ``folder``; return its path."""
    import yaml

    catalog = yaml.safe_load((REPO / "include" / "services.yaml").read_text())
    for environment in catalog.get("environments", {}).values():
        environment["approval"] = False
    for service in catalog["services"]:
        if service["name"] == "auth-service":
            service["maintenance_window"] = {"cron": "0 0 * * *", "duration_minutes": 1440, "timezone": "UTC"}
            service["deploy"]["estimated_minutes"] = 1
    path = folder / "services.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr (Airflow's task logs) to ``path`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)


def say(message: str) -> None:
    print(message, flush=True)


def main() -> int:
    started_here = not stack.is_running(stack.DEFAULT_STATE_DIR)
    say(f"1/{STEPS} Starting the devstack (PostgreSQL, local AWS endpoint with the ECS simulator, sample services)...")
    env = stack.start(stack.DEFAULT_STATE_DIR)
    os.environ.update(env)
    log_path = stack.DEFAULT_STATE_DIR / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
    catalog_dir = Path(tempfile.mkdtemp(prefix="omni-demo-catalog-"))
    os.environ["OMNISPHERE_CATALOG"] = str(demo_catalog(catalog_dir))
    try:
        say(f"2/{STEPS} Preparing Airflow's metadata database in .airflow/ ...")
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=os.environ.copy())
        with output_to(log_path):
            from omnisphere_release.migrations.__main__ import main as migrate_cli

            for service in SERVICES:  # start from empty databases so that the demo can be run again
                migrate_cli([service, "down", "--to", "0", "--reason", "make demo: start from scratch"])
            with production_databases(env):
                migrate_cli(["all", "down", "--to", "0", "--reason", "make demo: start from scratch"])

        from airflow.dag_processing.dagbag import DagBag

        with output_to(log_path):
            bag = DagBag(dag_folder=str(REPO / "dags"))
        if bag.import_errors:
            say(f"DAG import errors: {bag.import_errors}")
            return 1
        dag = bag.dags["schema_migrations"]
        say(f"3/{STEPS} Dry run of schema_migrations for all services (prints the plan, changes nothing)...")
        with output_to(log_path):
            dry = dag.test(run_conf={"service": "all"})
        say(f"    dry run: {state(dry)}")
        say(f"4/{STEPS} Applying schema_migrations for all services, in depends_on order...")
        t0 = time.monotonic()
        with output_to(log_path):
            real = dag.test(run_conf={"service": "all", "dry_run": False, "reason": "make demo"})
        elapsed = time.monotonic() - t0
        results = {}
        for ti in real.get_task_instances():
            if ti.task_id.startswith("migrate_wave_") and ti.map_index >= 0:
                results[(ti.task_id, ti.map_index)] = str(ti.state)
        say(f"5/{STEPS} Releasing auth-service 1.1.0 to staging (rolling, 6 s bake)...")
        for service in SERVICES[:1]:  # leave one migration pending so the release has schema work to do
            with output_to(log_path):
                migrate_cli([service, "down", "--reason", "make demo: leave 004 to the release"])
        release = bag.dags["release_auth-service"]
        # The release's DAG callbacks (its team's news) run as the DAG processor runs them (devstack/dag_test.py).
        with output_to(log_path), dag_processor(release):
            good = release.test(run_conf={"image_tag": "1.1.0", "bake_minutes": 0.1, "reason": "make demo",
                                          "window": "now", "force_reason": "make demo on the local stack"})
        say(f"6/{STEPS} Releasing auth-service 1.2.0-errors to staging: its 5xx rate breaks the monitoring gate...")
        # The failing release also brings a new migration (in a scratch copy of include/sql), so that its rollback
        # has schema work to undo as well.
        scratch = Path(tempfile.mkdtemp(prefix="omni-demo-sql-"))
        shutil.copytree(REPO / "include" / "sql", scratch / "sql")
        feature = scratch / "sql" / "auth-service" / "migrations" / "005_create_feature_flags"
        Path(f"{feature}.up.sql").write_text("CREATE TABLE feature_flags (name text PRIMARY KEY, enabled boolean "
                                              "NOT NULL DEFAULT false);\n")
        Path(f"{feature}.down.sql").write_text("DROP TABLE feature_flags;\n")
        os.environ["OMNISPHERE_SQL_DIR"] = str(scratch / "sql")
        try:
            with output_to(log_path), dag_processor(release):
                bad = release.test(run_conf={"image_tag": "1.2.0-errors", "bake_minutes": 0.2,
                                             "reason": "make demo", "window": "now",
                                             "force_reason": "make demo on the local stack"})
        finally:
            os.environ.pop("OMNISPHERE_SQL_DIR")
            shutil.rmtree(scratch, ignore_errors=True)
        # In the (always open) window, not forced: dag.test() keeps a DAG's params from its last run, so say so
        # explicitly (the staging releases above were forced outside their window).
        promote = {"environment": "production", "window": "next", "force_reason": None, "bake_minutes": 0.1,
                   "reason": "make demo: promote"}
        say(f"7/{STEPS} Promoting auth-service 1.2.0-errors to production: it never succeeded in staging...")
        with output_to(log_path), dag_processor(release):
            refused = release.test(run_conf={"image_tag": "1.2.0-errors", **promote})
        say(f"8/{STEPS} Promoting auth-service 1.1.0 to production: the image staging released, by digest...")
        with output_to(log_path), dag_processor(release):
            promoted = release.test(run_conf={"image_tag": "1.1.0", **promote})
        say("")
        say(f"schema_migrations run: {state(real).upper()} in {elapsed:.1f}s "
            f"({sum(1 for s in results.values() if 'success' in s)} of {len(results)} service migrations succeeded)")
        say(f"{'service':<22}{'version':>8}  applied migrations")
        for service in SERVICES:
            applied = history(env, service)
            say(f"{service:<22}{(applied[-1][0] if applied else 0):>8}  {', '.join(f'{v:03d}_{n}' for v, n in applied)}")
        say("")
        for title, run in (("good release", good), ("failing release", bad)):
            tasks = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
            say(f"release_auth-service, {title}: run {state(run).upper()}")
            say("    stages:   " + ", ".join(f"{t} {tasks.get(t, '-')}" for t in (
                "preflight", "approve_release", "backup", "schema_up", "integrity_check", "ecs_deploy", "smoke_test",
                "regression_test", "monitoring_gate",
                "finalize")))
            if state(run) != "success":
                say("    rollback: " + ", ".join(f"{t} {tasks.get(t, '-')}" for t in (
                    "rollback_ecs", "rollback_schema", "restore_backup", "verify_rollback", "release_failed")))
        service_now = service_image(env, "auth-service")
        good_digest = tag_digest(env, "auth-service", "1.1.0")
        say(f"auth-service now runs {service_now} (the digest of tag 1.1.0, deployed by digest) at schema version "
            f"{history(env, 'auth-service')[-1][0]}: the failing release was undone.")
        say("")
        refused_tasks = {ti.task_id: str(ti.state) for ti in refused.get_task_instances()}
        was_refused = "failed" in refused_tasks.get("preflight", "") and "upstream_failed" in refused_tasks.get(
            "backup", "")
        say(f"Promotion of 1.2.0-errors to production: run {state(refused).upper()}, "
            + (f"refused by preflight, nothing changed:\n    {preflight_problems(log_path)}" if was_refused
               else f"NOT refused by preflight ({refused_tasks}): the demo is wrong"))
        production_now = service_image(env, "auth-service", "omnisphere-production")
        evidence = ((output_of(promoted, "preflight") or {}).get("promotion") or {}).get("evidence") or {}
        say(f"Promotion of 1.1.0 to production: run {state(promoted).upper()}; production's auth-service runs "
            f"{production_now} at schema version {history(env, 'auth-service', '_PRODUCTION')[-1][0]}.")
        say(f"    evidence: staging release run {evidence.get('run_id')} of {evidence.get('image_digest')}, released "
            f"{evidence.get('finished_at')}, same {len(evidence.get('migrations') or {})} migration checksum(s); "
            f"{evidence.get('stored_at')}")
        say("")
        say(f"Airflow's task logs of every run, with the release reports: {log_path}")
        say("Next: `make up` opens the Airflow UI on http://localhost:8080 with the same stack.")
        expected = (state(real), state(dry), state(good), state(bad), state(refused), state(promoted)) == (
            "success", "success", "success", "failed", "failed", "success")
        promoted_right = (was_refused and production_now.endswith(f"@{good_digest}")
                          and evidence.get("image_digest") == good_digest)
        return 0 if expected and service_now.endswith(f"@{good_digest}") and promoted_right else 1
    finally:
        os.environ.pop("OMNISPHERE_CATALOG", None)
        shutil.rmtree(catalog_dir, ignore_errors=True)
        if started_here:
            stack.stop(stack.DEFAULT_STATE_DIR)
            say("The devstack was stopped (run `make devstack` first to keep it running after the demo).")


def state(run) -> str:
    return str(run.state.value if hasattr(run.state, "value") else run.state)


@contextlib.contextmanager
def production_databases(env: dict[str, str]):
    """Point omni-migrate (which reads OMNI_PG_DSN_<SERVICE>) at production's databases for the duration."""
    names = [f"OMNI_PG_DSN_{service.upper().replace('-', '_')}" for service in SERVICES]
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: env[f"{name}_PRODUCTION"] for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def output_of(run, task_id: str):
    """Return what a task of a dag.test() run returned (its XCom), or None."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id, task_ids=task_id,
                                                  key="return_value")).all()
        return XComModel.deserialize_value(rows[0]) if rows else None


def preflight_problems(log_path: Path) -> str:
    """Return the last promotion refusal preflight logged (the demo's log holds every task's output)."""
    found = [line.split("  - ", 1)[1].strip() for line in log_path.read_text(errors="replace").splitlines()
             if "  - promotion to production needs evidence" in line]
    return found[-1] if found else ""


def service_image(env: dict[str, str], service: str, cluster: str = "omnisphere") -> str:
    import boto3

    ecs = boto3.client("ecs", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                       aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    arn = ecs.describe_services(cluster=cluster, services=[service])["services"][0]["taskDefinition"]
    return ecs.describe_task_definition(taskDefinition=arn)["taskDefinition"]["containerDefinitions"][0]["image"]


def tag_digest(env: dict[str, str], service: str, tag: str) -> str:
    """Return the digest ``tag`` points at in the local registry (a release deploys by digest)."""
    import boto3

    ecr = boto3.client("ecr", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                       aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    details = ecr.describe_images(repositoryName=f"omnisphere/{service}", imageIds=[{"imageTag": tag}])
    return str(details["imageDetails"][0]["imageDigest"])


def history(env: dict[str, str], service: str, suffix: str = "") -> list[tuple[int, str]]:
    import psycopg2

    with psycopg2.connect(env[f"OMNI_PG_DSN_{service.upper().replace('-', '_')}{suffix}"]) as conn, \
            conn.cursor() as cur:
        cur.execute("SELECT version, name FROM omnisphere_schema_history WHERE state = 'applied' ORDER BY version")
        return cur.fetchall()


if __name__ == "__main__":
    sys.exit(main())
