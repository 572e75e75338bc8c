"""The one thing the engines and stages need of a logger, so that Python's and Airflow's task loggers both fit."""

from __future__ import annotations

from typing import Any, Protocol


class Log(Protocol):
    def info(self, msg: str, /, *args: Any) -> Any: ...

    def warning(self, msg: str, /, *args: Any) -> Any: ...
