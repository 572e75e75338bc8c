"""Which images the registry check asks ECR about, and what it says for each answer ECR can give."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from omnisphere_release.hooks.registry import ImageRegistryHook, parse_ecr_image

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("image", "expected"), [
    ("123456789012.dkr.ecr.eu-west-1.amazonaws.com/omnisphere/auth-service:1.4.0",
     ("123456789012", "eu-west-1", "omnisphere/auth-service", "1.4.0", None)),
    (f"123456789012.dkr.ecr.us-east-1.amazonaws.com/auth@{DIGEST}",
     ("123456789012", "us-east-1", "auth", None, DIGEST)),
    ("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/auth:v2_rc.1", ("123456789012", "cn-north-1", "auth", "v2_rc.1", None)),
    ("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com/auth", ("123456789012", "us-gov-west-1", "auth", None, None)),
])
def test_ecr_images_are_parsed(image, expected):
    parsed = parse_ecr_image(image)
    assert (parsed.registry, parsed.region, parsed.repository, parsed.tag, parsed.digest) == expected


@pytest.mark.parametrize("image", ["nginx:1.27", "ghcr.io/omnisphere/auth:1.0", "public.ecr.aws/nginx/nginx:1.27",
                                   "localhost:5000/auth:1.0", "12345.dkr.ecr.eu-west-1.amazonaws.com/auth:1.0"])
def test_other_registries_are_not_ecr(image):
    assert parse_ecr_image(image) is None


class FakeEcr:
    """Answers DescribeImages as ECR does; records what was asked."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.calls = error, []

    def describe_images(self, **kwargs):
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        return {"imageDetails": [{"imageDigest": DIGEST, "imagePushedAt": datetime(2026, 11, 24, tzinfo=timezone.utc)}]}


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "..."}}, "DescribeImages")


IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/omnisphere/auth-service:1.4.0"


def test_a_pushed_image_gives_its_digest_and_asks_the_image_region_and_registry():
    ecr, regions = FakeEcr(), []
    check = ImageRegistryHook(client_for_region=lambda region: regions.append(region) or ecr).check(IMAGE)
    assert (check.checked, check.problem, check.digest) == (True, None, DIGEST)
    assert check.pushed_at.startswith("2026-11-24")
    assert regions == ["eu-west-1"]
    assert ecr.calls == [{"registryId": "123456789012", "repositoryName": "omnisphere/auth-service",
                          "imageIds": [{"imageTag": "1.4.0"}]}]


@pytest.mark.parametrize(("error", "says"), [
    (client_error("ImageNotFoundException"), "was never pushed: push it"),
    (client_error("RepositoryNotFoundException"), "its ECR repository omnisphere/auth-service does not exist"),
    (client_error("AccessDeniedException"), "needs ecr:DescribeImages"),
    (EndpointConnectionError(endpoint_url="https://api.ecr.eu-west-1.amazonaws.com"), "could not reach ECR"),
])
def test_each_ecr_failure_is_a_problem_that_says_what_to_do(error, says):
    check = ImageRegistryHook(client_for_region=lambda region: FakeEcr(error)).check(IMAGE)
    assert check.checked and says in check.problem
    assert "omnisphere/auth-service:1.4.0" in check.problem


def test_an_image_outside_ecr_is_not_asked_about():
    ecr = FakeEcr()
    check = ImageRegistryHook(client_for_region=lambda region: ecr).check("ghcr.io/omnisphere/auth:1.0")
    assert (check.checked, check.problem) == (False, None) and ecr.calls == []
