"""Is the image a release deploys really in its registry? Asked before anything changes.

A tag that was never pushed (a typo, a CI build that failed) otherwise surfaces only after the backup and the schema
migrations, as ECS tasks that cannot pull their image, then a circuit breaker and a rollback. ECR images
(``<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>``) are checked with ecr:DescribeImages through the
service's AWS connection; an image in another registry is not checked, and the log says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

DIGEST_PATTERN = r"sha256:[0-9a-f]{64}"  # how ECR names an image for good
ECR_IMAGE = re.compile(
    r"^(?P<registry>\d{12})\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
    r"(?P<repository>[a-z0-9][a-z0-9._/-]*?)(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>" + DIGEST_PATTERN + r"))?$")


@dataclass(frozen=True)
class EcrImage:
    registry: str
    region: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def image_id(self) -> dict[str, str]:
        return {"imageDigest": self.digest} if self.digest else {"imageTag": self.tag or "latest"}

    def __str__(self) -> str:
        reference = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"{self.repository}{reference} (ECR registry {self.registry}, {self.region})"


def parse_ecr_image(image: str) -> EcrImage | None:
    """Return the parts of an ECR image reference, or None for an image in another registry."""
    match = ECR_IMAGE.match(image)
    if not match:
        return None
    return EcrImage(match["registry"], match["region"], match["repository"], match["tag"], match["digest"])


@dataclass(frozen=True)
class ImageCheck:
    image: str
    checked: bool  # False: not an ECR image, nothing was asked
    problem: str | None = None  # why the release must not use this image
    digest: str | None = None  # what the tag points at now, as ECS will resolve it
    pushed_at: str | None = None


class ImageRegistryHook:
    """Ask ECR whether an image exists, with the AWS connection a release already uses."""

    def __init__(self, aws_conn_id: str | None = "aws_default", client_for_region: Any | None = None) -> None:
        self.aws_conn_id = aws_conn_id
        self._client_for_region = client_for_region
        self._clients: dict[str, Any] = {}

    def _client(self, region: str) -> Any:
        if region not in self._clients:
            if self._client_for_region is not None:
                self._clients[region] = self._client_for_region(region)
            else:
                from omnisphere_release.hooks.aws import aws_client

                self._clients[region] = aws_client("ecr", self.aws_conn_id, region)
        return self._clients[region]

    def check(self, image: str) -> ImageCheck:
        ecr = parse_ecr_image(image)
        if ecr is None:
            return ImageCheck(image, checked=False)
        try:
            response = self._client(ecr.region).describe_images(
                registryId=ecr.registry, repositoryName=ecr.repository, imageIds=[ecr.image_id])
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ImageNotFoundException":
                problem = (f"image {ecr} was never pushed: push it (CI builds and pushes before it triggers) or "
                           f"check the tag")
            elif code == "RepositoryNotFoundException":
                problem = (f"image {ecr}: its ECR repository {ecr.repository} does not exist: check the image of "
                           f"the service's task definition")
            else:
                problem = (f"could not check image {ecr}: {code or exc}; the AWS connection needs "
                           f"ecr:DescribeImages on the repository")
            return ImageCheck(image, checked=True, problem=problem)
        except BotoCoreError as exc:
            return ImageCheck(image, checked=True, problem=f"could not reach ECR to check image {ecr}: {exc}")
        details = (response.get("imageDetails") or [{}])[0]
        pushed = details.get("imagePushedAt")
        return ImageCheck(image, checked=True, digest=details.get("imageDigest"),
                          pushed_at=pushed.isoformat() if hasattr(pushed, "isoformat") else pushed)
