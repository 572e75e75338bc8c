"""Promotion on evidence, end to end on the devstack's two environments: a production release of auth-service needs a
successful staging release of the same image digest, with the same migration and data-migration checksums, no older
than the catalog's limit.

Each refusal must change nothing in production (its ECS service, its schema, the content of its tables) and say what
is missing; a release of a staged image passes and names its evidence. The releases run in an always-open maintenance
window, without evidence_override (the rule's override, a reason of its own: a test shows it recorded, and that the
window's force_reason does not override the rule), and production
needs no approver here (the approve_release gate has tests of its own).
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import boto3
import psycopg2
import pytest
from psycopg2 import sql

from tests.e2e.helpers import RunOutcome, catalog_copy, push_image, run_dag
from tests.pg import schema_dump

# Several whole releases each: in `make test-long` (CI runs it after `make test`), not in `make test`.
pytestmark = [pytest.mark.e2e, pytest.mark.long]
SERVICE = "auth-service"
PRODUCTION_CLUSTER = "omnisphere-production"


def always_open(catalog: dict) -> None:
    """auth-service's maintenance window: open all day (so window=next starts at once, without a force_reason)."""
    for service in catalog["services"]:
        if service["name"] == SERVICE:
            service["maintenance_window"] = {"cron": "0 0 * * *", "duration_minutes": 1440, "timezone": "UTC"}
            service["deploy"]["estimated_minutes"] = 1


def release(environment: str, tag: str, **conf: object) -> RunOutcome:
    return run_dag(f"release_{SERVICE}", {"image_tag": tag, "environment": environment, "window": "next",
                                          "bake_minutes": 0.1, "reason": "e2e promotion", **conf})


def production_dsn() -> str:
    return os.environ["OMNI_PG_DSN_AUTH_SERVICE_PRODUCTION"]


def production_state() -> dict:
    """What a refused production release must leave as it was: the service's task definition, the schema, and a
    checksum of every table's content."""
    dsn = production_dsn()
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        # Not the lease table: a refused release takes over (and frees) the lease of a run that has ended, as it must.
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                    "AND tablename <> 'omnisphere_operation_lock' ORDER BY tablename")
        tables = [row[0] for row in cur.fetchall()]
        checksums = {}
        for table in tables:
            cur.execute(sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) "
                                "FROM {} t").format(sql.Identifier(table)))
            checksums[table] = cur.fetchone()
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    service = ecs.describe_services(cluster=PRODUCTION_CLUSTER, services=[SERVICE])["services"][0]
    return {"task_definition": service["taskDefinition"], "tables": checksums,
            "schema": schema_dump(dsn, os.environ["OMNI_PG_BIN_DIR"])}


def assert_refused(outcome: RunOutcome, before: dict, log: str, *expected: str) -> None:
    assert outcome.state == "failed", outcome.tasks
    assert outcome.task("preflight") == "failed" and outcome.task("backup") == "upstream_failed", outcome.tasks
    assert outcome.outputs["report"]["outcome"] == "refused"
    assert production_state() == before
    for text in expected:
        assert text in log, f"{text!r} not in the log"


@pytest.fixture(scope="module")
def staged(devstack, airflow_db, tmp_path_factory):
    """A catalog whose auth-service window is always open; production at schema version 3 with rows; and one image,
    released to staging. Yield the tag, its digest and the staging run."""
    from omnisphere_release.migrations.__main__ import main as migrate

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMNISPHERE_CATALOG", str(catalog_copy(tmp_path_factory.mktemp("promotion"), always_open)))
        patch.delenv("OMNISPHERE_SQL_DIR", raising=False)
        for dsn in (os.environ["OMNI_PG_DSN_AUTH_SERVICE"], production_dsn()):  # the CLI reads this variable
            patch.setenv("OMNI_PG_DSN_AUTH_SERVICE", dsn)
            assert migrate([SERVICE, "down", "--to", "0", "--reason", "e2e promotion reset"]) == 0
            assert migrate([SERVICE, "up", "--to", "3", "--reason", "e2e promotion reset"]) == 0
        patch.setenv("OMNI_PG_DSN_AUTH_SERVICE", os.environ["OMNI_PG_DSN_AUTH_SERVICE"])
        with psycopg2.connect(production_dsn()) as conn, conn.cursor() as cur:
            cur.executemany("INSERT INTO users (email, password_hash) VALUES (%s, %s)",
                            [(f"customer{i}@example.com", f"hash-{i}") for i in range(25)])
        tag = f"5.{uuid.uuid4().hex[:6]}"
        digest = push_image(SERVICE, tag)
        staging = release("staging", tag)
        assert staging.state == "success", staging.tasks
        yield {"tag": tag, "digest": digest, "run": staging, "patch": patch}


def test_a_staging_release_keeps_its_evidence_by_service_environment_and_digest(staged):
    report = staged["run"].outputs["report"]
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = os.environ["AIRFLOW_VAR_OMNI_EVIDENCE_BUCKET"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{SERVICE}/staging/{staged['digest']}/")
            .get("Contents", [])]
    assert keys == [f"{SERVICE}/staging/{staged['digest']}/{quote(staged['run'].run_id, safe='')}.json"]
    assert report["evidence_at"] == f"s3://{bucket}/{keys[0]}"
    record = json.loads(s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read())
    evidence = record["evidence"]
    assert (evidence["run_id"], evidence["outcome"], evidence["environment"]) == (staged["run"].run_id, "released",
                                                                                   "staging")
    assert evidence["image_digest"] == staged["digest"] == report["target"]["image_digest"]
    assert sorted(evidence["migrations"]) == ["1", "2", "3", "4"] and evidence["schema_version"] == 4
    assert evidence["migrations"]["4"]["name"] == "004_users_last_login"
    assert record["report"]["run_id"] == staged["run"].run_id


def test_a_production_release_of_an_image_never_released_to_staging_is_refused_with_nothing_changed(staged, capfd):
    tag = f"5.{uuid.uuid4().hex[:6]}"
    digest = push_image(SERVICE, tag)
    before = production_state()
    outcome = release("production", tag)
    assert_refused(outcome, before, "".join(capfd.readouterr()),
                   f"promotion to production needs evidence from staging: no release of image {digest} (tag {tag}) "
                   f"in staging: release it to staging first")


def test_a_migration_changed_after_the_staging_release_is_refused_naming_it(staged, capfd, sql_dir):
    up = sql_dir / SERVICE / "migrations" / "004_users_last_login.up.sql"
    up.write_text(up.read_text() + "\n-- edited after staging\n")
    before = production_state()
    outcome = release("production", staged["tag"])
    assert_refused(outcome, before, "".join(capfd.readouterr()),
                   f"the staging release run {staged['run'].run_id} of image {staged['digest']}",
                   "migration 004_users_last_login's checksum differs (up file)")


def test_evidence_older_than_the_catalogs_limit_is_refused_saying_how_old(staged, capfd):
    """A staging release 200 hours ago (its record in the store, as an older release left it): too old for 168."""
    tag = f"5.{uuid.uuid4().hex[:6]}"
    digest = push_image(SERVICE, tag)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = os.environ["AIRFLOW_VAR_OMNI_EVIDENCE_BUCKET"]
    [staged_key] = [o["Key"] for o in s3.list_objects_v2(
        Bucket=bucket, Prefix=f"{SERVICE}/staging/{staged['digest']}/")["Contents"]]
    record = json.loads(s3.get_object(Bucket=bucket, Key=staged_key)["Body"].read())
    old = (datetime.now(timezone.utc) - timedelta(hours=200)).isoformat(timespec="seconds")
    record["evidence"].update(image_digest=digest, image_tag=tag, run_id="manual__old", finished_at=old)
    s3.put_object(Bucket=bucket, Key=f"{SERVICE}/staging/{digest}/manual__old.json", Body=json.dumps(record))
    before = production_state()
    outcome = release("production", tag)
    assert_refused(outcome, before, "".join(capfd.readouterr()),
                   f"the newest successful staging release of image {digest} (tag {tag}), run manual__old, is 200 "
                   f"hours old; the limit is 168 hours (environments.production.evidence_max_age_hours)")


def test_the_staged_image_is_promoted_to_production_naming_its_evidence(staged, capfd):
    ecs = boto3.client("ecs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    staging_before = ecs.describe_services(cluster="omnisphere", services=[SERVICE])["services"][0]["taskDefinition"]
    outcome = release("production", staged["tag"])
    assert outcome.state == "success", outcome.tasks
    plan = outcome.outputs["preflight"]
    assert plan["environment"] == "production"
    promotion = plan["promotion"]
    assert promotion["overridden"] is False and promotion["problems"] == []
    assert promotion["evidence"]["run_id"] == staged["run"].run_id
    log = "".join(capfd.readouterr())
    assert (f"Promotion to production: evidence: the staging release run {staged['run'].run_id} of {SERVICE} "
            f"released image {staged['digest']} (tag {staged['tag']})") in log
    production = ecs.describe_services(cluster=PRODUCTION_CLUSTER, services=[SERVICE])["services"][0]
    [container] = ecs.describe_task_definition(taskDefinition=production["taskDefinition"])["taskDefinition"][
        "containerDefinitions"]
    assert container["image"].endswith(f"@{staged['digest']}")  # the very image staging proved
    assert ecs.describe_services(cluster="omnisphere", services=[SERVICE])["services"][0]["taskDefinition"] == \
        staging_before  # production's release touched production only
    with psycopg2.connect(production_dsn()) as conn, conn.cursor() as cur:
        cur.execute("SELECT max(version) FROM omnisphere_schema_history WHERE state = 'applied'")
        assert cur.fetchone()[0] == 4


def test_an_evidence_override_overrides_missing_evidence_loudly_and_on_record(staged, capfd):
    tag = f"5.{uuid.uuid4().hex[:6]}"
    push_image(SERVICE, tag)
    outcome = release("production", tag, dry_run=True, evidence_override="hotfix for incident 4711")
    assert outcome.state == "success", outcome.tasks
    promotion = outcome.outputs["preflight"]["promotion"]
    assert promotion["overridden"] is True and promotion["override_reason"] == "hotfix for incident 4711"
    assert promotion["evidence"] is None and "no release of image" in promotion["problems"][0]
    log = "".join(capfd.readouterr())
    assert "PROMOTION RULE OVERRIDDEN for auth-service in production, because: hotfix for incident 4711" in log


def test_forcing_the_window_does_not_skip_the_promotion_rule(staged, capfd):
    """A hotfix forced outside the window with force_reason still needs its evidence: only evidence_override, a
    decision of its own, skips it (so does not a scheduled release_all, which forces each child's window)."""
    tag = f"6.{uuid.uuid4().hex[:6]}"
    push_image(SERVICE, tag)
    before = production_state()
    outcome = release("production", tag, window="now", force_reason="hotfix for incident 4712")
    assert_refused(outcome, before, "".join(capfd.readouterr()),
                   "to release without it, give param evidence_override (why)")


def test_the_tag_pushed_again_after_its_promotion_is_another_image_and_is_refused(staged, capfd):
    """CI rebuilds the released tag: the tag now points at an image staging never released."""
    from devstack.aws import push_image as push_build

    ecr = boto3.client("ecr", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    rebuilt = push_build(ecr, SERVICE, staged["tag"], build="rebuilt after its release")  # same tag, another digest
    assert rebuilt != staged["digest"]
    before = production_state()
    outcome = release("production", staged["tag"])
    assert_refused(outcome, before, "".join(capfd.readouterr()),
                   f"no release of image {rebuilt} (tag {staged['tag']}) in staging")
