"""The devstack's ECR: moto's registry, made to keep what ECR keeps, and the way from a digest back to a tag.

A release deploys its image by digest (``<repository>@sha256:...``, the image preflight checked), while the devstack
acts out its faults and the sample services' /version by tag (``-crashloop``, ``-unhealthy``, ``-errors``). So the ECS
simulator resolves a digest here: to the newest tag that points at its image in the local registry or, once that tag
was pushed again and points at another image, to the newest tag the image was pushed under.

moto also deletes the image a tag pointed at when the tag is pushed again; ECR keeps it, untagged, and ECS can still
pull it by digest. ``install`` makes moto keep it too. Test infrastructure: plugins/ and dags/ never import it.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from moto.ecr import models as ecr_models

DIGEST_REFERENCE = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com/(?P<repository>[^:@]+)(?::[^@]+)?"
    r"@(?P<digest>sha256:[0-9a-f]{64})$")

_lock = threading.Lock()
_pushed_as: dict[tuple[str, str], list[str]] = {}  # (repository, digest) -> the tags it was pushed under, oldest first
_installed = False


def install() -> None:
    """Patch moto's ECR: remember the tags each image was pushed under, and keep an image whose tag was pushed again
    in its repository, untagged (idempotent: a second stack in the same process installs nothing more)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    backend_cls = ecr_models.ECRBackend
    original_put_image = backend_cls.put_image

    def put_image(backend: Any, repository_name: str, image_manifest: str, image_tag: str, *args: Any,
                  **kwargs: Any) -> Any:
        repository = backend.repositories.get(repository_name)
        before = list(repository.images) if repository is not None else []
        image = original_put_image(backend, repository_name, image_manifest, image_tag, *args, **kwargs)
        if repository is not None:
            now = {id(i) for i in repository.images}
            for dropped in (i for i in before if id(i) not in now):
                dropped.remove_tag(image_tag)
            known = {id(i) for i in before}
            repository.images[:] = before + [i for i in repository.images if id(i) not in known]
        if image_tag:
            with _lock:
                tags = _pushed_as.setdefault((repository_name, image.get_image_digest()), [])
                if image_tag in tags:
                    tags.remove(image_tag)
                tags.append(image_tag)
        return image

    backend_cls.put_image = put_image


def tag_of(image: str) -> str | None:
    """Return the tag an ECR digest reference stands for in the local registry: the newest tag on its image, else the
    newest tag it was pushed under; None for another reference, or a digest the registry never had."""
    match = DIGEST_REFERENCE.match(image)
    if not match:
        return None
    repository_name, digest = match["repository"], match["digest"]
    repository = ecr_models.ecr_backends[match["account"]][match["region"]].repositories.get(repository_name)
    for candidate in list(repository.images) if repository is not None else []:
        if candidate.image_tags and candidate.get_image_digest() == digest:
            return str(candidate.image_tags[-1])  # moto adds a tag to an image at the end of its list
    with _lock:
        pushed = _pushed_as.get((repository_name, digest))
        return pushed[-1] if pushed else None
