"""`make demo`: the main job on the local stack, end to end, with a summary a person can read.

1. schema_migrations for every service: a dry run (the plan, changing nothing), then the real run in depends_on order.
2. release_auth-service to a good image: backup, schema_up, integrity_check, ecs_deploy, smoke_test, monitoring_gate.
3. release_auth-service to an image whose 5xx rate breaks the monitoring gate: the release rolls back on its own
   (ECS to the previous revision, schema down) and the run ends FAILED, as it must.

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

SERVICES = ("auth-service", "billing-service", "notification-service")


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
    say("1/6 Starting the devstack (PostgreSQL, local AWS endpoint with the ECS simulator, sample services)...")
    env = stack.start(stack.DEFAULT_STATE_DIR)
    os.environ.update(env)
    log_path = stack.DEFAULT_STATE_DIR / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        say("2/6 Preparing Airflow's metadata database in .airflow/ ...")
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=os.environ.copy())
        with output_to(log_path):
            from omnisphere_release.migrations.__main__ import main as migrate_cli

            for service in SERVICES:  # start from empty databases so that the demo can be run again
                migrate_cli([service, "down", "--to", "0", "--reason", "make demo: start from scratch"])

        from airflow.dag_processing.dagbag import DagBag

        with output_to(log_path):
            bag = DagBag(dag_folder=str(REPO / "dags"))
        if bag.import_errors:
            say(f"DAG import errors: {bag.import_errors}")
            return 1
        dag = bag.dags["schema_migrations"]
        say("3/6 Dry run of schema_migrations for all services (prints the plan, changes nothing)...")
        with output_to(log_path):
            dry = dag.test(run_conf={"service": "all"})
        say(f"    dry run: {state(dry)}")
        say("4/6 Applying schema_migrations for all services, in depends_on order...")
        t0 = time.monotonic()
        with output_to(log_path):
            real = dag.test(run_conf={"service": "all", "dry_run": False, "reason": "make demo"})
        elapsed = time.monotonic() - t0
        results = {}
        for ti in real.get_task_instances():
            if ti.task_id.startswith("migrate_wave_") and ti.map_index >= 0:
                results[(ti.task_id, ti.map_index)] = str(ti.state)
        say("5/6 Releasing auth-service 1.1.0 (rolling, 6 s bake)...")
        for service in SERVICES[:1]:  # leave one migration pending so the release has schema work to do
            with output_to(log_path):
                migrate_cli([service, "down", "--reason", "make demo: leave 004 to the release"])
        release = bag.dags["release_auth-service"]
        with output_to(log_path):
            good = release.test(run_conf={"image_tag": "1.1.0", "bake_minutes": 0.1, "reason": "make demo",
                                          "window": "now", "force_reason": "make demo on the local stack"})
        say("6/6 Releasing auth-service 1.2.0-errors: its 5xx rate breaks the monitoring gate...")
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
            with output_to(log_path):
                bad = release.test(run_conf={"image_tag": "1.2.0-errors", "bake_minutes": 0.2,
                                             "reason": "make demo", "window": "now",
                                             "force_reason": "make demo on the local stack"})
        finally:
            os.environ.pop("OMNISPHERE_SQL_DIR")
            shutil.rmtree(scratch, ignore_errors=True)
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
                "preflight", "backup", "schema_up", "integrity_check", "ecs_deploy", "smoke_test", "monitoring_gate",
                "finalize")))
            if state(run) != "success":
                say("    rollback: " + ", ".join(f"{t} {tasks.get(t, '-')}" for t in (
                    "rollback_ecs", "rollback_schema", "restore_backup", "verify_rollback", "release_failed")))
        service_now = service_image(env, "auth-service")
        good_digest = tag_digest(env, "auth-service", "1.1.0")
        say(f"auth-service now runs {service_now} (the digest of tag 1.1.0, deployed by digest) at schema version "
            f"{history(env, 'auth-service')[-1][0]}: the failing release was undone.")
        say("")
        say(f"Airflow's task logs of every run, with the release reports: {log_path}")
        say("Next: `make up` opens the Airflow UI on http://localhost:8080 with the same stack.")
        expected = (state(real), state(dry), state(good), state(bad)) == ("success", "success", "success", "failed")
        return 0 if expected and service_now.endswith(f"@{good_digest}") else 1
    finally:
        if started_here:
            stack.stop(stack.DEFAULT_STATE_DIR)
            say("The devstack was stopped (run `make devstack` first to keep it running after the demo).")


def state(run) -> str:
    return str(run.state.value if hasattr(run.state, "value") else run.state)


def service_image(env: dict[str, str], service: str) -> str:
    import boto3

    ecs = boto3.client("ecs", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                       aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    arn = ecs.describe_services(cluster="omnisphere", services=[service])["services"][0]["taskDefinition"]
    return ecs.describe_task_definition(taskDefinition=arn)["taskDefinition"]["containerDefinitions"][0]["image"]


def tag_digest(env: dict[str, str], service: str, tag: str) -> str:
    """Return the digest ``tag`` points at in the local registry (a release deploys by digest)."""
    import boto3

    ecr = boto3.client("ecr", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                       aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    details = ecr.describe_images(repositoryName=f"omnisphere/{service}", imageIds=[{"imageTag": tag}])
    return str(details["imageDetails"][0]["imageDigest"])


def history(env: dict[str, str], service: str) -> list[tuple[int, str]]:
    import psycopg2

    with psycopg2.connect(env[f"OMNI_PG_DSN_{service.upper().replace('-', '_')}"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT version, name FROM omnisphere_schema_history WHERE state = 'applied' ORDER BY version")
        return cur.fetchall()


if __name__ == "__main__":
    sys.exit(main())
