"""S3 faults for the devstack: a bucket whose name ends ``-unwritable`` exists and answers HeadBucket, but refuses
every write with AccessDenied, the way a bucket with a wrong policy does. Test infrastructure only."""

from __future__ import annotations

from typing import Any

from moto.s3 import models as s3_models
from moto.s3.exceptions import BucketAccessDeniedError

UNWRITABLE_SUFFIX = "-unwritable"


def install() -> None:
    backend_cls = s3_models.S3Backend
    for method in ("put_object", "create_multipart_upload"):
        original = getattr(backend_cls, method)

        def refusing(self: Any, bucket_name: str, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if bucket_name.endswith(UNWRITABLE_SUFFIX):
                raise BucketAccessDeniedError(bucket=bucket_name)
            return _original(self, bucket_name, *args, **kwargs)

        setattr(backend_cls, method, refusing)
