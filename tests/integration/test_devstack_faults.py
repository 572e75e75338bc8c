"""``python -m devstack faults``: the local AWS endpoint fails as AWS does and botocore retries it; an outage refuses
connections and ends by itself; a PostgreSQL restart drops sessions and the server is back when the command returns.
Each test that sets faults clears them at its end (the devstack is shared by the session)."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import psycopg2
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError
from botocore.retries.standard import (
    RetryContext,
    RetryEventAdapter,
    StandardRetryConditions,
    ThrottlingErrorDetector,
)

from devstack import faults

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NO_RETRIES = Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5)


def aws(service: str, config: Config = NO_RETRIES) -> Any:
    return boto3.client(service, endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="eu-west-1", config=config)


def cli(*arguments: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "devstack", "faults", *arguments], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """Return what one call gave: ("ok", response), ("ClientError:<code>:<status>", error) or (<exception>, error)."""
    try:
        return "ok", call()
    except ClientError as error:
        return (f"ClientError:{error.response['Error']['Code']}:"
                f"{error.response['ResponseMetadata']['HTTPStatusCode']}"), error
    except (ConnectionClosedError, EndpointConnectionError) as error:
        return type(error).__name__, error


def botocore_sees(client: Any, operation: str, error: ClientError) -> tuple[bool, bool]:
    """Return (a throttling error?, retryable in standard mode?) as botocore's retry handler judges ``error``."""
    return botocore_judges(client.meta.service_model, operation, error)


def botocore_judges(service_model: Any, operation: str, error: ClientError) -> tuple[bool, bool]:
    context = RetryContext(attempt_number=1, operation_model=service_model.operation_model(operation),
                           parsed_response=error.response,
                           http_response=SimpleNamespace(status_code=error.response["ResponseMetadata"]
                                                         ["HTTPStatusCode"]))
    return (ThrottlingErrorDetector(RetryEventAdapter()).is_throttling_error_from_context(context),
            StandardRetryConditions(max_attempts=3).is_retryable(context))


@pytest.fixture()
def state_dir(devstack: dict[str, str]) -> Iterator[Path]:
    """The session devstack's state folder; every AWS fault is cleared after the test."""
    path = Path(devstack["OMNI_DEVSTACK_DIR"])
    try:
        yield path
    finally:
        faults.clear_aws_faults(path)


def describe(ecs: Any) -> Any:
    return ecs.describe_services(cluster="omnisphere", services=["auth-service"])


# ---- the endpoint's answers ----------------------------------------------------------------------------------------
def test_throttling_is_the_protocols_own_error_and_botocore_retries_it_as_throttling(state_dir):
    """ECS (JSON) and CloudWatch (JSON, query-compatible) throttle in their own words; both are throttling to botocore,
    which retries them in standard mode."""
    ran = cli("aws", "--rate", "1", "--kinds", "throttle", "--state-dir", str(state_dir))
    assert ran.returncode == 0, ran.stderr
    assert "100% of the answers fail (throttle)" in ran.stdout and "clear with --rate 0" in ran.stdout
    ecs, cloudwatch = aws("ecs"), aws("cloudwatch")
    for client, operation, call, code in (
        (ecs, "DescribeServices", lambda: describe(ecs), "ThrottlingException"),
        (cloudwatch, "ListMetrics", cloudwatch.list_metrics, "Throttling"),
    ):
        seen, error = outcome(call)
        assert seen == f"ClientError:{code}:400"
        assert botocore_sees(client, operation, error) == (True, True)
    retrying = aws("ecs", Config(retries={"mode": "standard", "total_max_attempts": 2}))
    seen, error = outcome(lambda: describe(retrying))
    assert seen == "ClientError:ThrottlingException:400"
    assert error.response["ResponseMetadata"]["RetryAttempts"] == 1  # a 400 is retried only as throttling


@pytest.mark.parametrize(("kind", "expected", "throttling"), [
    ("503", "ClientError:ServiceUnavailableException:503", False),
    ("drop", "ConnectionClosedError", False),
])
def test_other_faults_are_transient_errors_to_botocore(state_dir, kind, expected, throttling):
    faults.set_aws_faults(state_dir, rate=1, kinds=[kind])
    ecs = aws("ecs")
    seen, error = outcome(lambda: describe(ecs))
    assert seen == expected
    if isinstance(error, ClientError):
        assert botocore_sees(ecs, "DescribeServices", error) == (throttling, True)
    else:
        assert StandardRetryConditions().is_retryable(RetryContext(attempt_number=1, caught_exception=error))


def test_rate_one_mixes_every_kind_and_rate_zero_clears_it(state_dir):
    faults.set_aws_faults(state_dir, rate=1)
    ecs = aws("ecs")
    seen = collections.Counter(outcome(lambda: describe(ecs))[0] for _ in range(40))
    assert set(seen) == {"ClientError:ThrottlingException:400", "ClientError:ServiceUnavailableException:503",
                         "ConnectionClosedError"}, seen  # each kind misses 40 draws with p < 1e-7
    ran = cli("aws", "--rate", "0", "--state-dir", str(state_dir))
    assert ran.returncode == 0 and "AWS endpoint: no faults" in ran.stdout, ran.stderr
    assert outcome(lambda: describe(ecs))[0] == "ok"


def test_standard_retries_carry_every_call_through_a_fifth_of_answers_failing(state_dir):
    faults.set_aws_faults(state_dir, rate=0.2)
    ecs = aws("ecs", Config(retries={"mode": "standard", "max_attempts": 10}, connect_timeout=2, read_timeout=5))
    retries = [describe(ecs)["ResponseMetadata"]["RetryAttempts"] for _ in range(50)]
    assert len(retries) == 50 and sum(retries) > 0  # no fault in 50 calls has p = 0.8**50 ~ 1e-5


def test_the_devstacks_own_calls_are_never_faulted(state_dir):
    """The sample services keep publishing their metrics while every client request fails."""
    from omnisphere_release.catalog import load_catalog

    target_group = next(s for s in load_catalog().services if s.name == "auth-service").monitoring.target_group
    log = state_dir / "devstack.log"
    log_start = log.stat().st_size
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    faults.set_aws_faults(state_dir, rate=1)
    time.sleep(float(os.environ.get("OMNI_METRICS_INTERVAL_SECONDS", "2")) * 1.5 + 0.5)  # at least one publication
    assert outcome(aws("ecs").list_clusters)[0] != "ok"
    faults.clear_aws_faults(state_dir)
    published = aws("cloudwatch").get_metric_statistics(
        Namespace="AWS/ApplicationELB", MetricName="RequestCount", StartTime=since,
        EndTime=datetime.now(timezone.utc) + timedelta(seconds=1), Period=60, Statistics=["SampleCount"],
        Dimensions=[{"Name": "TargetGroup", "Value": target_group}])["Datapoints"]
    assert sum(point["SampleCount"] for point in published) >= 1
    with log.open(errors="replace") as file:
        file.seek(log_start)
        written = file.read()
    assert "fault injected: " in written and "ListClusters" in written
    assert "PutMetricData" not in written and "Could not publish metrics" not in written


# ---- an outage -----------------------------------------------------------------------------------------------------
def test_an_outage_refuses_connections_then_ends_by_itself(state_dir):
    ecs = aws("ecs")
    asked = time.monotonic()
    ran = cli("aws", "--outage", "3", "--state-dir", str(state_dir))
    assert ran.returncode == 0, ran.stderr
    assert "unreachable for 3s more" in ran.stdout and "back by itself" in ran.stdout
    seen: collections.Counter[str] = collections.Counter()
    while (result := outcome(ecs.list_clusters)[0]) != "ok":
        seen[result] += 1
        assert time.monotonic() - asked < 15, f"the endpoint is still unreachable: {seen}"
        time.sleep(0.05)
    back_after = time.monotonic() - asked
    assert set(seen) == {"EndpointConnectionError"} and seen["EndpointConnectionError"] >= 5
    assert 2.5 <= back_after <= 8, f"the outage of 3s lasted {back_after:.1f}s"
    assert outcome(lambda: describe(ecs))[0] == "ok"


def test_clear_ends_an_outage_under_way(state_dir):
    faults.set_aws_faults(state_dir, outage_seconds=600)
    assert outcome(aws("ecs").list_clusters)[0] == "EndpointConnectionError"
    ran = cli("aws", "--clear", "--state-dir", str(state_dir))
    assert ran.returncode == 0 and "no faults" in ran.stdout, ran.stderr
    assert outcome(aws("ecs").list_clusters)[0] == "ok"


# ---- PostgreSQL ----------------------------------------------------------------------------------------------------
def test_a_postgres_restart_drops_open_sessions_and_the_server_is_back_when_it_returns(state_dir, scratch_database):
    with psycopg2.connect(scratch_database) as setup, setup.cursor() as cur:
        cur.execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (42)")
    setup.close()
    open_session = psycopg2.connect(scratch_database)
    with open_session.cursor() as cur:
        cur.execute("SELECT 1")
    ran = cli("postgres", "--restart", "--state-dir", str(state_dir))
    assert ran.returncode == 0, ran.stderr
    assert "accepts connections again after" in ran.stdout
    with pytest.raises(psycopg2.OperationalError), open_session.cursor() as cur:
        cur.execute("SELECT 1")
    open_session.close()
    new_session = psycopg2.connect(scratch_database)  # at once: no wait after the command returned
    try:
        with new_session.cursor() as cur:
            cur.execute("SELECT id FROM kept")
            assert cur.fetchall() == [(42,)]
    finally:
        new_session.close()


# ---- the command's arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arguments", "message"), [
    ([], "the following arguments are required: aws|postgres"),
    (["s3"], "invalid choice: 's3'"),
    (["aws"], "say what to do: --rate SHARE, --outage SECONDS or --clear"),
    (["aws", "--rate", "1.5"], "a rate is a share of the answers between 0 and 1 (e.g. 0.2), not 1.5"),
    (["aws", "--rate", "lots"], "not a number: 'lots'"),
    (["aws", "--rate", "0.2", "--kinds", "throttle,timeout"], "unknown fault kind 'timeout'"),
    (["aws", "--kinds", "drop"], "--kinds goes with --rate"),
    (["aws", "--outage", "0"], "an outage lasts more than 0 and at most 3600 seconds, not 0"),
    (["aws", "--clear", "--rate", "0.2"], "--clear ends every fault: give it alone"),
    (["postgres"], "the following arguments are required: --restart"),
])
def test_bad_arguments_exit_2_with_the_usage_and_change_nothing(tmp_path, arguments, message):
    ran = cli(*arguments, "--state-dir", str(tmp_path)) if arguments else cli()
    assert ran.returncode == 2
    assert ran.stderr.startswith("usage: python -m devstack faults") and message in ran.stderr, ran.stderr
    assert not (tmp_path / faults.FAULTS_FILE).exists()


def test_faults_need_a_running_devstack(tmp_path):
    for arguments in (["aws", "--rate", "0.2"], ["postgres", "--restart"]):
        ran = cli(*arguments, "--state-dir", str(tmp_path))
        assert ran.returncode == 1
        assert f"the devstack is not running (state folder {tmp_path})" in ran.stderr
        assert "`make devstack`" in ran.stderr
    with pytest.raises(faults.DevstackNotRunning):
        faults.set_aws_faults(tmp_path, rate=0.2)
    assert not (tmp_path / faults.FAULTS_FILE).exists()


# ---- each protocol's throttling, as botocore parses it (no devstack) -----------------------------------------------
@pytest.mark.parametrize(("service", "protocol", "environ", "status", "code"), [
    ("ecs", "json", {"HTTP_X_AMZ_TARGET": "AmazonEC2ContainerServiceV20141113.DescribeServices",
                     "CONTENT_TYPE": "application/x-amz-json-1.1"}, 400, "ThrottlingException"),
    ("cloudwatch", "json", {"HTTP_X_AMZ_TARGET": "GraniteServiceVersion20100801.ListMetrics",
                            "HTTP_X_AMZN_QUERY_MODE": "true", "CONTENT_TYPE": "application/x-amz-json-1.0"},
     400, "Throttling"),
    ("cloudwatch", "smithy-rpc-v2-cbor", {"HTTP_SMITHY_PROTOCOL": "rpc-v2-cbor", "HTTP_X_AMZN_QUERY_MODE": "true",
                                          "CONTENT_TYPE": "application/cbor"}, 400, "Throttling"),
    ("cloudwatch", "query", {"CONTENT_TYPE": "application/x-www-form-urlencoded; charset=utf-8"}, 400, "Throttling"),
    ("s3", "rest-xml", {"HTTP_AUTHORIZATION": "AWS4-HMAC-SHA256 Credential=AKIA/20260101/eu-west-1/s3/aws4_request, "
                                              "SignedHeaders=host, Signature=0"}, 503, "SlowDown"),
])
def test_each_protocols_throttling_parses_as_throttling(service, protocol, environ, status, code):
    import botocore.session
    from botocore.parsers import create_parser

    model = botocore.session.get_session().get_service_model(service)
    operation = {"ecs": "DescribeServices", "cloudwatch": "ListMetrics", "s3": "ListBuckets"}[service]
    status_line, headers, body = faults.error_response(environ, faults.THROTTLING)
    response = {"status_code": int(status_line.split()[0]), "headers": {k.lower(): v for k, v in headers},
                "body": body}
    parsed = create_parser(protocol).parse(response, model.operation_model(operation).output_shape)
    assert (response["status_code"], parsed["Error"]["Code"]) == (status, code)
    error = ClientError({**parsed, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)
    assert botocore_judges(model, operation, error) == (True, True)
