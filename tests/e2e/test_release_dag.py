"""release_<service> end to end on the devstack: a good release, and a failure injected at every stage.

Every failure must end the same way: the run FAILED, the service on its previous task definition, the schema as
before (pg_dump --schema-only), the data as before where a restore ran, and a report that says what was undone.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import psycopg2
import pytest
import yaml

from devstack.aws import IMAGE_REPOSITORY
from tests.e2e.helpers import RunOutcome, auth_service_at_version_3, push_image, run_dag
from tests.pg import schema_dump

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
SERVICE = "auth-service"
DSN_VAR = "OMNI_PG_DSN_AUTH_SERVICE"
BASE_VERSION = 3
# The tests release at once; the maintenance-window wait has tests of its own.
NOW = {"bake_minutes": 0.1, "reason": "e2e", "window": "now", "force_reason": "e2e test"}


@pytest.fixture()
def release_env(devstack, airflow_db, sql_dir, tmp_path, monkeypatch):
    """A catalog with short deadlines, auth-service at schema version 3 with some users, and its "before" state."""
    assert BASE_VERSION == 3
    dsn = os.environ[DSN_VAR]
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('users') IS NOT NULL")
        if cur.fetchone()[0]:
            cur.execute("TRUNCATE users CASCADE")
    auth_service_at_version_3(tmp_path, monkeypatch)
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO users (email, password_hash) VALUES (%s, %s)",
                        [(f"user{i}@example.com", f"hash-{i}") for i in range(40)])
    state = {"sql_dir": sql_dir, "migrations": sql_dir / SERVICE / "migrations", "checks": sql_dir / SERVICE / "checks",
             "before": snapshot()}
    return state


def snapshot() -> dict:
    dsn = os.environ[DSN_VAR]
    schema = schema_dump(dsn, os.environ["OMNI_PG_BIN_DIR"])
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, email, password_hash FROM users ORDER BY id")
        users = cur.fetchall()
        cur.execute("SELECT max(version) FROM omnisphere_schema_history WHERE state = 'applied'")
        version = cur.fetchone()[0]
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    service = ecs.describe_services(cluster="omnisphere", services=[SERVICE])["services"][0]
    return {"schema": schema, "users": users, "version": version, "task_definition": service["taskDefinition"]}


def release(tag_suffix: str = "", **conf) -> RunOutcome:
    tag = f"2.{uuid.uuid4().hex[:6]}{tag_suffix}"
    push_image(SERVICE, tag)
    return run_dag(f"release_{SERVICE}", {"image_tag": tag, **NOW, **conf})


def assert_rolled_back(outcome: RunOutcome, before: dict, failed_stage: str, restored: bool = False) -> None:
    assert outcome.state == "failed", outcome.tasks
    assert outcome.task(failed_stage) == "failed", outcome.tasks
    assert outcome.task("release_failed") == "failed"
    assert outcome.task("report") == "success"
    assert outcome.task("verify_rollback") == "success", outcome.tasks
    assert outcome.task("restore_backup") == ("success" if restored else "skipped"), outcome.tasks
    after = snapshot()
    assert after["task_definition"] == before["task_definition"]
    assert after["version"] == before["version"]
    assert after["schema"] == before["schema"]
    assert after["users"] == before["users"]
    report = outcome.outputs["report"]
    assert report["outcome"] == "rolled_back"
    assert report["after"]["task_definition"] == before["task_definition"]
    assert report["rollback"]["verify_rollback"]["state"] == "success"
    stages = {s["stage"]: s["state"] for s in report["stages"]}
    assert stages[failed_stage] == "failed"


def test_good_release_updates_image_and_schema_and_reports(release_env):
    # A tag that looks like a number must stay text: "3.10", not the float 3.1.
    digest = push_image(SERVICE, "3.10")
    outcome = run_dag(f"release_{SERVICE}", {"image_tag": "3.10", **NOW})
    assert outcome.state == "success", outcome.tasks
    for stage in ("preflight", "backup", "schema_up", "integrity_check", "ecs_deploy", "smoke_test",
                  "monitoring_gate", "finalize", "report"):
        assert outcome.task(stage) == "success", stage
    assert outcome.task("rollback_ecs") == "skipped" and outcome.task("release_failed") == "skipped"
    after = snapshot()
    assert after["version"] == 4 and after["task_definition"] != release_env["before"]["task_definition"]
    report = outcome.outputs["report"]
    assert report["outcome"] == "released"
    # Deployed by digest: the image preflight found under the tag, whatever the tag points at later.
    assert report["after"]["image"] == f"{IMAGE_REPOSITORY}/{SERVICE}@{digest}"
    assert report["target"]["image_digest"] == digest  # what the tag meant when it was released
    assert report["migrations_applied"] == [4]
    assert report["backup"]["sha256"] and report["backup"]["uri"].startswith("s3://")
    assert report["monitoring"]["observations"]
    # The change record: each migration with what it is for, the image by digest, the reason.
    changes = report["changes"]
    assert [(m["version"], m["description"][:25]) for m in changes["migrations"]] == [(4, "Remember the last sign-in")]
    assert changes["image"]["after_digest"] == digest and changes["reason"] == NOW["reason"]
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket, key = report["stored_at"].removeprefix("s3://").split("/", 1)
    assert b'"outcome": "released"' in s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    markdown = s3.get_object(Bucket=bucket, Key=key.replace(".json", ".md"))["Body"].read().decode()
    assert "## Changes" in markdown and "Remember the last sign" in markdown.split("## Changes")[1]


def test_a_tag_pushed_again_after_preflight_changes_nothing_that_is_deployed(release_env, monkeypatch):
    """CI pushes the tag again (a rebuild, a hotfix under the same name) while the release is backing up: the release
    still deploys the image preflight checked, by its digest."""
    from devstack.aws import push_image as push_build
    from omnisphere_release.hooks.backups import BackupHook

    ecr = boto3.client("ecr", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    tag = f"2.{uuid.uuid4().hex[:6]}"
    checked = push_image(SERVICE, tag)
    pushed_again: list[str] = []
    dump_to_s3 = BackupHook.dump_to_s3

    def push_again_then_dump(self, *args, **kwargs):  # the backup stage: after preflight, before ecs_deploy
        pushed_again.append(push_build(ecr, SERVICE, tag, build="pushed after preflight"))
        return dump_to_s3(self, *args, **kwargs)

    monkeypatch.setattr(BackupHook, "dump_to_s3", push_again_then_dump)
    outcome = run_dag(f"release_{SERVICE}", {"image_tag": tag, **NOW})
    assert outcome.state == "success", outcome.tasks
    assert len(pushed_again) == 1 and pushed_again[0] != checked
    now = ecr.describe_images(repositoryName=f"omnisphere/{SERVICE}", imageIds=[{"imageTag": tag}])["imageDetails"]
    assert now[0]["imageDigest"] == pushed_again[0]  # the tag really moved
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    running = ecs.describe_services(cluster="omnisphere", services=[SERVICE])["services"][0]["taskDefinition"]
    [container] = ecs.describe_task_definition(taskDefinition=running)["taskDefinition"]["containerDefinitions"]
    assert container["image"] == f"{IMAGE_REPOSITORY}/{SERVICE}@{checked}"
    report = outcome.outputs["report"]
    assert report["target"]["image_digest"] == checked
    assert report["after"]["image"] == container["image"]


def test_dry_run_changes_nothing(release_env):
    outcome = release(dry_run=True)
    assert outcome.state == "success"
    assert outcome.task("preflight") == "success" and outcome.task("backup") == "skipped"
    assert outcome.outputs["report"]["outcome"] == "dry_run"
    after = snapshot()
    assert (after["version"], after["task_definition"]) == (BASE_VERSION, release_env["before"]["task_definition"])


def test_preflight_refusal_changes_nothing(release_env):
    (release_env["migrations"] / "005_index_emails.up.sql").write_text("CREATE INDEX users_lower_email ON users (lower(email));")
    (release_env["migrations"] / "005_index_emails.down.sql").write_text("DROP INDEX users_lower_email;")
    outcome = release()
    assert outcome.state == "failed"
    assert outcome.task("preflight") == "failed" and outcome.task("backup") == "upstream_failed"
    assert outcome.outputs["report"]["outcome"] == "refused"
    after = snapshot()
    assert after["schema"] == release_env["before"]["schema"]
    assert after["task_definition"] == release_env["before"]["task_definition"]


def test_image_never_pushed_is_refused_before_anything_changes(release_env, capfd):
    tag = f"2.{uuid.uuid4().hex[:6]}"  # a typo, or a CI build that never pushed
    outcome = run_dag(f"release_{SERVICE}", {"image_tag": tag, **NOW})
    assert outcome.state == "failed"
    assert outcome.task("preflight") == "failed" and outcome.task("backup") == "upstream_failed"
    assert outcome.outputs["report"]["outcome"] == "refused"
    assert snapshot() == release_env["before"]
    log = "".join(capfd.readouterr())
    assert f"image omnisphere/{SERVICE}:{tag} (ECR registry 123456789012, eu-west-1) was never pushed" in log


def _fail_schema_up(env):
    m = env["migrations"]
    (m / "005_audit.up.sql").write_text("CREATE TABLE IF NOT EXISTS audit_events (id bigint PRIMARY KEY, what text);")
    (m / "005_audit.down.sql").write_text("DROP TABLE audit_events;")
    (m / "006_broken.up.sql").write_text("INSERT INTO no_such_table (id) VALUES (1);")
    (m / "006_broken.down.sql").write_text("SELECT 1;")
    (m / "007_later.up.sql").write_text("CREATE TABLE IF NOT EXISTS later (id bigint PRIMARY KEY);")
    (m / "007_later.down.sql").write_text("DROP TABLE later;")


def _fail_integrity(env):
    m = env["migrations"]
    (m / "005_import_users.up.sql").write_text(
        "INSERT INTO users (email, password_hash) VALUES ('Dup@example.com', 'x'), ('dup@example.com', 'y');")
    (m / "005_import_users.down.sql").write_text("DELETE FROM users WHERE lower(email) = 'dup@example.com';")


FAULTS = {
    "backup": ({}, "", "backup"),
    "schema_up": ({}, "", "schema_up"),
    "integrity_check": ({}, "", "integrity_check"),
    "ecs_deploy": ({}, "-crashloop", "ecs_deploy"),
    "smoke_test": ({}, "-unhealthy", "smoke_test"),
    "monitoring_gate": ({}, "-errors", "monitoring_gate"),
}


# The strategy is read from ecs_deploy on: a failure before it is the same whatever the strategy, so it runs once.
DEPLOY_STAGES = ("ecs_deploy", "smoke_test", "monitoring_gate")


@pytest.mark.parametrize(("stage", "strategy"), [
    (stage, strategy) for stage in FAULTS
    for strategy in (("rolling", "canary") if stage in DEPLOY_STAGES else ("rolling",))])
def test_failure_at_each_stage_is_rolled_back_completely(release_env, monkeypatch, stage, strategy):
    conf, suffix, failed_stage = FAULTS[stage]
    if stage == "backup":
        monkeypatch.setenv("AIRFLOW_VAR_OMNI_BACKUP_BUCKET", "omnisphere-backups-local-unwritable")
    elif stage == "schema_up":
        _fail_schema_up(release_env)
    elif stage == "integrity_check":
        _fail_integrity(release_env)
    outcome = release(suffix, strategy=strategy, **conf)
    assert_rolled_back(outcome, release_env["before"], failed_stage)
    undone = outcome.outputs["report"]["rollback"]
    if stage in ("smoke_test", "monitoring_gate"):
        assert undone["rollback_ecs"]["result"]["action"] != "none"
    if stage in ("schema_up", "integrity_check"):
        assert undone["rollback_schema"]["result"]["reverted"]


def test_failing_down_file_leads_to_restore_and_a_consistent_database(release_env):
    m = release_env["migrations"]
    (m / "005_tokens_note.up.sql").write_text("ALTER TABLE api_tokens ADD COLUMN note text;")
    (m / "005_tokens_note.down.sql").write_text("ALTER TABLE api_tokens DROP COLUMN no_such_column;")
    outcome = release("-unhealthy")
    assert outcome.task("rollback_schema") == "failed"
    assert_rolled_back(outcome, release_env["before"], "smoke_test", restored=True)
    assert outcome.outputs["report"]["rollback"]["restore_backup"]["result"]["reason"] == "the schema rollback failed"


def test_irreversible_migration_is_undone_by_restoring_the_backup(release_env):
    m = release_env["migrations"]
    (m / "005_drop_sessions_agent.up.sql").write_text(
        "-- omni:irreversible the user agents are dropped\n"
        "-- omni:lint-ignore ban-drop-column no reader left since 1.0\n"
        "ALTER TABLE sessions DROP COLUMN user_agent;")
    outcome = release("-errors")
    assert_rolled_back(outcome, release_env["before"], "monitoring_gate", restored=True)


def test_restore_policy_always_restores_after_the_schema_rollback(release_env):
    outcome = release("-crashloop", restore_policy="always")
    assert outcome.task("rollback_schema") == "success"
    assert_rolled_back(outcome, release_env["before"], "ecs_deploy", restored=True)


def test_second_trigger_of_the_same_release_touches_nothing(release_env):
    first = release()
    assert first.state == "success"
    after_first = snapshot()
    tag = first.outputs["preflight"]["image_tag"]
    second = run_dag(f"release_{SERVICE}", {"image_tag": tag, **NOW, "reason": "duplicate"})
    assert second.state == "failed" and second.task("preflight") == "failed"
    assert second.task("backup") == "upstream_failed"
    assert snapshot() == after_first


def test_invalid_params_are_rejected_before_a_run_exists(airflow_db):
    from airflow.sdk.definitions.param import ParamValidationError

    for conf, field in (({"image_tag": "bad tag!"}, "image_tag"), ({}, "image_tag"),
                        ({"image_tag": "1.0", "strategy": "big_bang"}, "strategy"),
                        ({"image_tag": "1.0", "restore_policy": "never"}, "restore_policy")):
        with pytest.raises(ParamValidationError, match=field):
            run_dag(f"release_{SERVICE}", conf)


def test_manual_rollback_after_a_good_release(release_env):
    released = release()
    assert released.state == "success"
    before = release_env["before"]
    backup_uri = released.outputs["backup"]["uri"]
    with psycopg2.connect(os.environ[DSN_VAR]) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO users (email, password_hash) VALUES ('late@example.com', 'z')")
    outcome = run_dag(f"rollback_{SERVICE}", {"task_definition": before["task_definition"],
                                             "schema_version": BASE_VERSION, "reason": "e2e: bad release"})
    assert outcome.state == "success", outcome.tasks
    assert outcome.task("rollback_restore") == "skipped"
    after = snapshot()
    assert (after["task_definition"], after["version"], after["schema"]) == (
        before["task_definition"], BASE_VERSION, before["schema"])
    assert len(after["users"]) == len(before["users"]) + 1  # no restore: the late row stays
    restored = run_dag(f"rollback_{SERVICE}", {"restore_backup_uri": backup_uri, "reason": "e2e: restore"})
    assert restored.state == "success", restored.tasks
    assert [restored.task(t) for t in ("rollback_ecs", "rollback_schema", "rollback_restore")] == [
        "skipped", "skipped", "success"]
    assert snapshot()["users"] == before["users"]


def test_manual_rollback_refuses_contradictory_params_and_an_image_the_registry_lacks(release_env, capfd):
    outcome = run_dag(f"rollback_{SERVICE}", {"image_tag": "1.0.0", "task_definition": "x", "reason": "e2e"})
    assert outcome.state == "failed" and outcome.task("plan") == "failed"
    assert outcome.task("rollback_ecs") == "upstream_failed"
    outcome = run_dag(f"rollback_{SERVICE}", {"reason": "e2e"})
    assert outcome.state == "failed" and outcome.task("plan") == "failed"
    # An old image expired by the registry's lifecycle policy: refused before ECS is asked to start it.
    outcome = run_dag(f"rollback_{SERVICE}", {"image_tag": "0.9.0-expired", "reason": "e2e"})
    assert outcome.state == "failed" and outcome.task("plan") == "failed"
    assert outcome.task("rollback_ecs") == "upstream_failed"
    log = "".join(capfd.readouterr())
    assert f"refused, nothing was changed: image omnisphere/{SERVICE}:0.9.0-expired" in log
    assert snapshot() == release_env["before"]


def _iso(seconds_from_now: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)).isoformat(timespec="seconds")


def _window_from(starts: datetime, tmp_path: Path, monkeypatch, **deploy) -> str:
    """Give auth-service a daily maintenance window of 120 minutes that starts at ``starts`` (to the minute, UTC),
    with ``deploy`` settings of the catalog changed; return that start as the window param.

    An ISO window param must lie inside one of the service's windows (outside one it needs a force_reason), and lasts
    until that window's end: so these tests move the catalog's window to where they need it.
    """
    starts = starts.replace(second=0, microsecond=0)
    catalog = yaml.safe_load(Path(os.environ["OMNISPHERE_CATALOG"]).read_text())
    service = next(s for s in catalog["services"] if s["name"] == SERVICE)
    service["maintenance_window"] = {"cron": f"{starts.minute} {starts.hour} * * *", "duration_minutes": 120,
                                     "timezone": "UTC"}
    service["deploy"].update(deploy)
    path = tmp_path / "services-window.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    monkeypatch.setenv("OMNISPHERE_CATALOG", str(path))
    return starts.isoformat(timespec="seconds")


def test_window_a_few_seconds_ahead_defers_then_releases(release_env, monkeypatch, tmp_path):
    import time as _time

    _window_from(datetime.now(timezone.utc), tmp_path, monkeypatch)  # open now, for two hours
    opens = _iso(20)  # a start inside it; dag.test needs a few seconds to reach its first task
    started = _time.monotonic()
    outcome = release(window=opens, force_reason="")
    assert outcome.state == "success", outcome.tasks
    assert _time.monotonic() - started >= 20
    assert outcome.outputs["wait_for_window"]["window_start"].startswith(opens[:19])
    assert outcome.outputs["wait_for_window"]["waited_deferred"] is True  # resumed by its trigger


def test_window_now_without_a_reason_is_refused_and_changes_nothing(release_env):
    outcome = release(force_reason="")
    assert outcome.state == "failed" and outcome.task("wait_for_window") == "failed"
    assert outcome.task("preflight") == "upstream_failed"
    assert snapshot() == release_env["before"]


def _fresh_backup_bucket(monkeypatch) -> None:
    """A bucket with no earlier release reports: the duration estimate is then the catalog's."""
    import boto3 as _boto3

    bucket = f"omni-window-{uuid.uuid4().hex[:8]}"
    s3 = _boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    monkeypatch.setenv("AIRFLOW_VAR_OMNI_BACKUP_BUCKET", bucket)


def test_window_without_room_for_the_release_is_refused_before_schema_up(release_env, monkeypatch, tmp_path):
    _fresh_backup_bucket(monkeypatch)  # estimate: the catalog's 20 minutes
    # A window that opened 118 minutes ago (to the minute) and closes within two minutes.
    window = _window_from(datetime.now(timezone.utc) - timedelta(minutes=118), tmp_path, monkeypatch)
    outcome = release(window=window, force_reason="")
    assert outcome.state == "failed" and outcome.task("preflight") == "failed"
    assert outcome.task("schema_up") == "upstream_failed"
    assert snapshot()["version"] == BASE_VERSION


@pytest.mark.long  # a bake that outlives its window (~85 s): in `make test-long`
def test_window_closing_during_the_bake_fails_the_gate_and_rolls_back(release_env, monkeypatch, tmp_path):
    # A window that closes on the first whole minute more than 45 s from now: time enough to reach the monitoring
    # gate, not to bake for 3 minutes. The estimate is the catalog's (no earlier reports in a fresh bucket): small.
    closes = (datetime.now(timezone.utc) + timedelta(seconds=45 + 60)).replace(second=0, microsecond=0)
    window = _window_from(closes - timedelta(minutes=120), tmp_path, monkeypatch, estimated_minutes=0.1)
    _fresh_backup_bucket(monkeypatch)
    outcome = release(window=window, force_reason="", bake_minutes=3)
    assert_rolled_back(outcome, release_env["before"], "monitoring_gate")
    assert datetime.fromisoformat(outcome.outputs["report"]["window"]["window_end"]) == closes


def _drop_connection(conn) -> None:
    """End ``conn``'s session from another one, as a database restart does: its next statement finds it gone."""
    with psycopg2.connect(os.environ[DSN_VAR]) as admin, admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", [conn.get_backend_pid()])
        assert cur.fetchone()[0]


def test_a_database_blip_during_schema_up_and_integrity_check_is_survived(release_env, monkeypatch, request):
    """The service database drops its connections after schema_up applied one of its two migrations, then again
    during integrity_check: both stages reconnect and go on, and the release succeeds with no rollback."""
    from omnisphere_release.hooks.postgres import ServiceDatabaseHook
    from omnisphere_release.migrations.__main__ import main as migrate
    from omnisphere_release.migrations.engine import MigrationEngine

    m = release_env["migrations"]
    (m / "005_audit.up.sql").write_text("CREATE TABLE audit_events (id bigint PRIMARY KEY, what text);")
    (m / "005_audit.down.sql").write_text("DROP TABLE audit_events;")
    dropped: list[str] = []
    apply, first_rows = MigrationEngine._apply, ServiceDatabaseHook.first_rows

    def apply_after_a_drop_before_the_second_migration(self, conn, migration, reason):
        if migration.version == 5 and "schema_up" not in dropped:
            dropped.append("schema_up")
            _drop_connection(conn)  # before the migration's first statement
        return apply(self, conn, migration, reason)

    def check_after_a_drop(self, conn, query, limit):
        if "integrity_check" not in dropped:
            dropped.append("integrity_check")
            _drop_connection(conn)
        return first_rows(self, conn, query, limit)

    monkeypatch.setattr(MigrationEngine, "_apply", apply_after_a_drop_before_the_second_migration)
    monkeypatch.setattr(ServiceDatabaseHook, "first_rows", check_after_a_drop)
    # 005 exists only in this test's SQL folder: revert it here, or the next test's reset finds a version it has no
    # file for (and every later test on this devstack fails in its setup).
    request.addfinalizer(lambda: migrate(["auth-service", "down", "--to", "3", "--reason", "test cleanup"]))

    outcome = release()

    assert dropped == ["schema_up", "integrity_check"]
    assert outcome.state == "success", outcome.tasks
    for stage in ("schema_up", "integrity_check", "finalize"):
        assert outcome.task(stage) == "success", stage
    assert outcome.task("rollback_ecs") == "skipped"
    # Both migrations are this release's, though a second connection applied the second one.
    assert (outcome.outputs["schema_up"]["from_version"], outcome.outputs["schema_up"]["to_version"]) == (3, 5)
    assert outcome.outputs["schema_up"]["versions"] == [4, 5]
    assert outcome.outputs["report"]["migrations_applied"] == [4, 5]
    assert snapshot()["version"] == 5
    assert outcome.outputs["report"]["outcome"] == "released"
