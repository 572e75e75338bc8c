"""The devstack behaves like the real parts it stands for: PostgreSQL, ECS rollouts, the services and CloudWatch."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import psycopg2
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/omnisphere/{service}:{tag}"


def aws(service: str):
    return boto3.client(service, endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="eu-west-1")


def deploy(ecs, service: str, tag: str, config: dict | None = None, image: str | None = None) -> str:
    """Push image ``tag`` (or take ``image`` as it is), register a revision with it and update the service; return the
    service deployment ARN."""
    from devstack.aws import push_image

    if image is None:
        push_image(aws("ecr"), service, tag)  # a later manual rollback to this revision checks that its image exists
    current = ecs.describe_services(cluster="omnisphere", services=[service])["services"][0]
    family = ecs.describe_task_definition(taskDefinition=current["taskDefinition"])["taskDefinition"]
    container = dict(family["containerDefinitions"][0], image=image or IMAGE.format(service=service, tag=tag))
    revision = ecs.register_task_definition(family=family["family"], containerDefinitions=[container],
                                            networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
                                            cpu="256", memory="512")["taskDefinition"]["taskDefinitionArn"]
    kwargs = {"deploymentConfiguration": config} if config else {}
    updated = ecs.update_service(cluster="omnisphere", service=service, taskDefinition=revision, **kwargs)
    return updated["service"]["currentServiceDeployment"]


def wait_final(ecs, arn: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deployment = ecs.describe_service_deployments(serviceDeploymentArns=[arn])["serviceDeployments"][0]
        if deployment["status"] not in {"PENDING", "IN_PROGRESS", "ROLLBACK_REQUESTED", "ROLLBACK_IN_PROGRESS",
                                        "STOP_REQUESTED"}:
            return deployment
        time.sleep(0.2)
    raise AssertionError(f"deployment {arn} still {deployment['status']} after {timeout}s")


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the devstack on 127.0.0.1
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_each_service_database_answers_psql_on_loopback(devstack):
    psql = Path(devstack["OMNI_PG_BIN_DIR"]) / "psql"
    for name in ("AUTH_SERVICE", "BILLING_SERVICE", "NOTIFICATION_SERVICE"):
        dsn = devstack[f"OMNI_PG_DSN_{name}"]
        assert "@127.0.0.1:" in dsn
        result = subprocess.run([str(psql), dsn, "-Atc", "select current_database()"], capture_output=True,
                                text=True, timeout=30, check=True)
        assert result.stdout.strip() == name.lower()
    with psycopg2.connect(devstack["OMNI_PG_ADMIN_DSN"]) as conn, conn.cursor() as cur:
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone()[0] == "127.0.0.1"


def test_services_and_task_definitions_of_the_catalog_exist(devstack):
    ecs = aws("ecs")
    services = ecs.describe_services(cluster="omnisphere", services=["auth-service", "billing-service",
                                                                     "notification-service"])["services"]
    assert [s["serviceName"] for s in services] == ["auth-service", "billing-service", "notification-service"]
    assert services[0]["desiredCount"] == 2 and services[1]["desiredCount"] == 3
    assert aws("s3").get_bucket_encryption(Bucket=devstack["AIRFLOW_VAR_OMNI_BACKUP_BUCKET"])


def test_production_runs_beside_staging_with_databases_cluster_buckets_and_samples_of_its_own(devstack):
    """The catalog's production environment: each service has its own database, an ECS service in the production
    cluster, its own sample service (serving what that cluster runs) and connections with the _production suffix;
    its backup bucket and the evidence bucket exist, encrypted. Staging stays as it was."""
    from omnisphere_release.catalog import load_catalog

    catalog = load_catalog()
    production = catalog.environment("production")
    psql = Path(devstack["OMNI_PG_BIN_DIR"]) / "psql"
    for name in ("AUTH_SERVICE", "BILLING_SERVICE", "NOTIFICATION_SERVICE"):
        staging_dsn, production_dsn = devstack[f"OMNI_PG_DSN_{name}"], devstack[f"OMNI_PG_DSN_{name}_PRODUCTION"]
        assert staging_dsn != production_dsn
        result = subprocess.run([str(psql), production_dsn, "-Atc", "select current_database()"],
                                capture_output=True, text=True, timeout=30, check=True)
        assert result.stdout.strip() == f"{name.lower()}_production"
        assert devstack[f"AIRFLOW_CONN_OMNI_PG_{name}_PRODUCTION"].startswith("postgres://")
        # The sample service's production listener, and its test listener in the extra (the URI's query).
        assert devstack[f"AIRFLOW_CONN_OMNI_HTTP_{name}_PRODUCTION"].startswith(
            devstack[f"OMNI_SAMPLE_URL_{name}_PRODUCTION"] + "?test_listener_port=")
    ecs = aws("ecs")
    services = ecs.describe_services(cluster=production.ecs_cluster, services=catalog.names)["services"]
    assert [s["serviceName"] for s in services] == catalog.names
    assert all(s["clusterArn"].endswith(f"/{production.ecs_cluster}") for s in services)
    # Production's sample service serves what production's ECS service runs (another test may have released it).
    running = ecs.describe_task_definition(taskDefinition=services[0]["taskDefinition"])["taskDefinition"]
    status, body = get_json(devstack["OMNI_SAMPLE_URL_AUTH_SERVICE_PRODUCTION"] + "/version")
    assert status == 200 and body["image"] == running["containerDefinitions"][0]["image"]
    assert devstack["AIRFLOW_VAR_OMNI_BACKUP_BUCKET_PRODUCTION"] != devstack["AIRFLOW_VAR_OMNI_BACKUP_BUCKET"]
    for variable in ("AIRFLOW_VAR_OMNI_BACKUP_BUCKET_PRODUCTION", "AIRFLOW_VAR_OMNI_EVIDENCE_BUCKET"):
        assert aws("s3").get_bucket_encryption(Bucket=devstack[variable])
    assert "AIRFLOW_VAR_OMNI_ENVIRONMENT" not in devstack  # environments are the catalog's, not a Variable's


def test_rolling_deployment_ramps_and_completes_and_the_service_serves_it(devstack):
    ecs = aws("ecs")
    arn = deploy(ecs, "auth-service", "1.1.0", {"strategy": "ROLLING", "maximumPercent": 200,
                                                  "minimumHealthyPercent": 100,
                                                  "deploymentCircuitBreaker": {"enable": True, "rollback": True}})
    first = ecs.describe_services(cluster="omnisphere", services=["auth-service"])["services"][0]
    assert first["deployments"][0]["status"] == "PRIMARY"
    assert first["deployments"][0]["rolloutState"] == "IN_PROGRESS"
    assert [d["status"] for d in first["deployments"]] == ["PRIMARY", "ACTIVE"]
    seen_counts = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        service = ecs.describe_services(cluster="omnisphere", services=["auth-service"])["services"][0]
        seen_counts.add(service["deployments"][0]["runningCount"])
        if service["deployments"][0]["rolloutState"] != "IN_PROGRESS":
            break
        time.sleep(0.1)
    assert service["deployments"][0]["rolloutState"] == "COMPLETED"
    assert len(service["deployments"]) == 1 and service["runningCount"] == 2
    assert len(seen_counts) >= 2, f"running count should ramp, saw {seen_counts}"
    assert wait_final(ecs, arn)["status"] == "SUCCESSFUL"
    status, body = get_json(devstack["OMNI_SAMPLE_URL_AUTH_SERVICE"] + "/version")
    assert status == 200 and body["version"] == "1.1.0"
    listed = ecs.list_service_deployments(cluster="omnisphere", service="auth-service")["serviceDeployments"]
    assert listed[0]["serviceDeploymentArn"] == arn and listed[0]["status"] == "SUCCESSFUL"


def test_crashloop_image_fails_through_the_circuit_breaker_and_rolls_back(devstack):
    ecs = aws("ecs")
    before = ecs.describe_services(cluster="omnisphere", services=["billing-service"])["services"][0]
    # Other tests on this devstack may have released billing-service: what it served before is what it must serve.
    _, served_before = get_json(devstack["OMNI_SAMPLE_URL_BILLING_SERVICE"] + "/version")
    arn = deploy(ecs, "billing-service", "2.0.0-crashloop",
                 {"strategy": "ROLLING", "deploymentCircuitBreaker": {"enable": True, "rollback": True}})
    final = wait_final(ecs, arn)
    assert final["status"] == "ROLLBACK_SUCCESSFUL"
    assert final["deploymentCircuitBreaker"]["status"] == "TRIGGERED"
    assert "circuit breaker" in final["statusReason"]
    service = ecs.describe_services(cluster="omnisphere", services=["billing-service"])["services"][0]
    failed = [d for d in service["deployments"] if d["taskDefinition"] != before["taskDefinition"]]
    assert failed and failed[0]["rolloutState"] == "FAILED"
    assert service["taskDefinition"] == before["taskDefinition"]
    status, body = get_json(devstack["OMNI_SAMPLE_URL_BILLING_SERVICE"] + "/version")
    assert body["version"] == served_before["version"] and not body["version"].endswith("-crashloop")


def test_crashloop_without_rollback_stops_failed(devstack):
    ecs = aws("ecs")
    arn = deploy(ecs, "notification-service", "3.0.0-crashloop",
                 {"strategy": "ROLLING", "deploymentCircuitBreaker": {"enable": True, "rollback": False}})
    final = wait_final(ecs, arn)
    assert final["status"] == "STOPPED"
    service = ecs.describe_services(cluster="omnisphere", services=["notification-service"])["services"][0]
    assert service["deployments"][0]["rolloutState"] == "FAILED"
    # Put the service back on a good image for the other tests.
    assert wait_final(ecs, deploy(ecs, "notification-service", "1.0.1"))["status"] == "SUCCESSFUL"


@pytest.mark.parametrize(("strategy", "extra", "stages"), [
    ("BLUE_GREEN", {"bakeTimeInMinutes": 1}, {"SCALE_UP", "BAKE_TIME", "CLEAN_UP"}),
    ("CANARY", {"bakeTimeInMinutes": 0, "canaryConfiguration": {"canaryPercent": 20.0, "canaryBakeTimeInMinutes": 1}},
     {"SCALE_UP", "BAKE_TIME"}),
    ("LINEAR", {"bakeTimeInMinutes": 0, "linearConfiguration": {"stepPercent": 50.0, "stepBakeTimeInMinutes": 1}},
     {"SCALE_UP", "BAKE_TIME"}),
])
def test_traffic_shifting_strategies_go_through_their_stages(devstack, strategy, extra, stages):
    ecs = aws("ecs")
    arn = deploy(ecs, "auth-service", f"1.2.0-{strategy.lower()}", {"strategy": strategy, **extra})
    seen_stages, weights = set(), set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        d = ecs.describe_service_deployments(serviceDeploymentArns=[arn])["serviceDeployments"][0]
        seen_stages.add(d["lifecycleStage"])
        weights.add(d["targetServiceRevision"]["requestedProductionTrafficWeight"])
        if d["status"] != "IN_PROGRESS":
            break
        time.sleep(0.1)
    assert d["status"] == "SUCCESSFUL"
    assert d["deploymentConfiguration"]["strategy"] == strategy
    assert stages <= seen_stages
    if strategy == "CANARY":
        assert 20.0 in weights
    if strategy == "LINEAR":
        assert 50.0 in weights


def test_stop_service_deployment_rollback_returns_to_the_previous_revision(devstack):
    ecs = aws("ecs")
    before = ecs.describe_services(cluster="omnisphere", services=["auth-service"])["services"][0]["taskDefinition"]
    arn = deploy(ecs, "auth-service", "1.3.0", {"strategy": "BLUE_GREEN", "bakeTimeInMinutes": 30})
    ecs.stop_service_deployment(serviceDeploymentArn=arn, stopType="ROLLBACK")
    final = wait_final(ecs, arn)
    assert final["status"] == "ROLLBACK_SUCCESSFUL"
    assert final["rollback"]["serviceRevisionArn"] == before
    assert ecs.describe_services(cluster="omnisphere", services=["auth-service"])["services"][0][
        "taskDefinition"] == before
    with pytest.raises(ecs.exceptions.ClientException, match="only an in-progress deployment can be stopped"):
        ecs.stop_service_deployment(serviceDeploymentArn=arn, stopType="ROLLBACK")


def test_unhealthy_image_fails_health_endpoints(devstack):
    ecs = aws("ecs")
    url = devstack["OMNI_SAMPLE_URL_NOTIFICATION_SERVICE"]
    assert get_json(url + "/health")[0] == 200
    assert wait_final(ecs, deploy(ecs, "notification-service", "1.4.0-unhealthy"))["status"] == "SUCCESSFUL"
    status, body = get_json(url + "/health")
    assert status == 503 and body["status"] == "failing"
    assert get_json(url + "/ready")[0] == 503
    assert wait_final(ecs, deploy(ecs, "notification-service", "1.4.1"))["status"] == "SUCCESSFUL"
    assert get_json(url + "/health")[0] == 200


def test_an_image_deployed_by_digest_acts_as_the_tag_it_was_pushed_as_after_the_tag_moved(devstack):
    """Releases deploy ``<repository>@sha256:...``: the simulator and the sample services find the tag in the registry."""
    from devstack.aws import IMAGE_REPOSITORY, push_image

    ecs, ecr = aws("ecs"), aws("ecr")
    url = devstack["OMNI_SAMPLE_URL_NOTIFICATION_SERVICE"]
    tag = f"1.6.{int(time.time())}-unhealthy"
    pinned = push_image(ecr, "notification-service", tag)
    assert push_image(ecr, "notification-service", tag) == pinned  # the same build again: the same image
    moved = push_image(ecr, "notification-service", tag, build="rebuilt")
    assert moved != pinned
    # As in ECR, the image the tag left stays in the repository, untagged, and can still be pulled by its digest.
    left = ecr.describe_images(repositoryName="omnisphere/notification-service",
                               imageIds=[{"imageDigest": pinned}])["imageDetails"][0]
    assert "imageTags" not in left
    image = f"{IMAGE_REPOSITORY}/notification-service@{pinned}"
    assert wait_final(ecs, deploy(ecs, "notification-service", tag, image=image))["status"] == "SUCCESSFUL"
    assert get_json(url + "/version") == (200, {"image": image, "version": tag})
    assert get_json(url + "/health")[0] == 503
    # An image under several tags is the newest of them.
    manifest = ecr.batch_get_image(repositoryName="omnisphere/notification-service",
                                   imageIds=[{"imageDigest": pinned}])["images"][0]["imageManifest"]
    ecr.put_image(repositoryName="omnisphere/notification-service", imageManifest=manifest, imageTag=f"{tag}-again")
    assert get_json(url + "/version")[1]["version"] == f"{tag}-again"
    assert wait_final(ecs, deploy(ecs, "notification-service", "1.6.1"))["status"] == "SUCCESSFUL"
    assert get_json(url + "/health")[0] == 200


def test_errors_image_publishes_a_5xx_rate_above_the_catalog_threshold(devstack):
    from omnisphere_release.catalog import load_catalog

    service = load_catalog().get("billing-service")
    ecs, cloudwatch = aws("ecs"), aws("cloudwatch")
    assert wait_final(ecs, deploy(ecs, "billing-service", "1.5.0-errors"))["status"] == "SUCCESSFUL"
    since = datetime.now(timezone.utc)
    dimensions = [{"Name": "TargetGroup", "Value": service.monitoring.target_group}]

    def total(metric: str) -> float:
        points = cloudwatch.get_metric_statistics(
            Namespace="AWS/ApplicationELB", MetricName=metric, Dimensions=dimensions, StartTime=since,
            EndTime=datetime.now(timezone.utc) + timedelta(minutes=1), Period=60, Statistics=["Sum"])["Datapoints"]
        return sum(p["Sum"] for p in points)

    deadline = time.monotonic() + 20
    while total("RequestCount") < 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    requests, errors = total("RequestCount"), total("HTTPCode_Target_5XX_Count")
    assert requests >= 200
    assert errors / requests > service.monitoring.max_error_rate
    assert wait_final(ecs, deploy(ecs, "billing-service", "1.5.1"))["status"] == "SUCCESSFUL"


def test_make_style_start_and_stop_leave_no_process_or_port():
    """A second stack in its own folder starts, then stops without leaving a process or a listening port."""
    import shutil
    import tempfile

    from devstack import stack
    from devstack.net import port_is_open

    tmp_path = Path(tempfile.mkdtemp(prefix="omni-devstack-second-"))
    env = stack.start(tmp_path / "stack")
    state = json.loads((tmp_path / "stack" / "state.json").read_text())
    pid = state["pid"]
    assert all(port_is_open(port) for port in state["ports"].values())
    assert stack.stop(tmp_path / "stack") == []
    assert not any(port_is_open(port) for port in state["ports"].values())
    ps = subprocess.run(["ps", "-eo", "pid,pgid,stat,args"], capture_output=True, text=True, check=True).stdout
    left = [line for line in ps.splitlines()[1:] if line.split()[1] == str(pid) or str(tmp_path) in line]
    assert left == [], "processes of the stopped stack still exist:\n" + "\n".join(left)
    assert env["OMNI_PG_DSN_AUTH_SERVICE"].startswith("postgresql://auth_service:")
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_registry_holds_the_built_images_and_push_image_adds_one_that_preflight_then_finds(devstack):
    """The production check (ImageRegistryHook, through the Airflow AWS connection) against the local registry."""
    import sys

    from devstack.aws import BUILT_TAGS
    from omnisphere_release.hooks.registry import ImageRegistryHook

    hook = ImageRegistryHook("aws_default")
    assert all(hook.check(IMAGE.format(service="auth-service", tag=tag)).digest for tag in BUILT_TAGS)
    tag = f"7.{int(time.time())}"
    image = IMAGE.format(service="billing-service", tag=tag)
    assert "was never pushed" in hook.check(image).problem

    def push(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "devstack", "push-image", "--state-dir",
                               devstack["OMNI_DEVSTACK_DIR"], *arguments], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    pushed = push("billing-service", tag)
    assert pushed.returncode == 0, pushed.stderr
    check = hook.check(image)
    assert check.problem is None and f"({check.digest})" in pushed.stdout
    rebuilt = push("billing-service", tag, "--build", "ci-rerun")  # the same tag pushed again: a new image
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert hook.check(image).digest not in (None, check.digest) and f"({hook.check(image).digest})" in rebuilt.stdout
    bad_tag = push("billing-service", "not a tag!")
    assert bad_tag.returncode == 2 and "not an image tag: 'not a tag!'" in bad_tag.stderr
    unknown = push("payments-service", "1.0")
    assert unknown.returncode == 2 and "no repository for service 'payments-service'" in unknown.stderr
