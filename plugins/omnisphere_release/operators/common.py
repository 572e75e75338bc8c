"""What the stage operators share: the service they act on, and reading rendered templates."""

from __future__ import annotations

import re
from typing import Any

from airflow.sdk import BaseOperator


def safe_key(text: str) -> str:
    """Make a run id usable in an S3 key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:120]


def as_bool(value: Any) -> bool:
    """Read a rendered template as a boolean ("True", "false", True...)."""
    return value if isinstance(value, bool) else str(value).strip().lower() in {"true", "1", "yes"}


def as_optional_int(value: Any) -> int | None:
    """Read a rendered template as an optional integer ("None" and "" mean none)."""
    if value is None or str(value).strip() in {"", "None", "null"}:
        return None
    return int(value)


def as_optional_text(value: Any) -> str | None:
    """Read a rendered template as optional text ("None" and "" mean none)."""
    return None if value is None or str(value) in {"None", ""} else str(value)


class ServiceStageOperator(BaseOperator):
    """A release stage that acts on one catalog service, named by ``service`` (templated)."""

    template_fields: tuple[str, ...] = ("service",)

    def __init__(self, *, service: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
