"""Read a service's load balancer metrics and alarms from CloudWatch, and its new tasks' error lines from CloudWatch
Logs."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

NAMESPACE = "AWS/ApplicationELB"
# filter_log_events takes at most 100 stream names per call.
STREAMS_PER_CALL = 100
# A log line quoted in the gate's log and the bake record: long enough for an exception's message, no whole dump.
MAX_LINE_CHARS = 300
# Lines a bake's log check reads at most per poll: enough to count past any sane threshold and quote a few.
MAX_SCANNED_LINES = 1000


@dataclass(frozen=True)
class MinuteReading:
    """One minute of load balancer metrics, as CloudWatch's 60 s datapoints give it."""

    minute: str  # ISO 8601 start of the minute, UTC
    requests: float
    errors_5xx: float
    p99_seconds: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"minute": self.minute, "requests": self.requests, "errors_5xx": self.errors_5xx,
                "p99_seconds": self.p99_seconds}


@dataclass(frozen=True)
class MetricsWindow:
    requests: float
    errors_5xx: float
    p99_seconds: float | None
    p99_source: str  # "p99", or "Maximum" when the endpoint returns no percentile (stricter than p99)
    alarms_firing: list[str]
    minutes: tuple[MinuteReading, ...] = ()  # the same window, minute by minute (for the bake's chart)

    @property
    def has_data(self) -> bool:
        return self.requests > 0

    @property
    def error_rate(self) -> float:
        return self.errors_5xx / self.requests if self.requests else 0.0

    def describe(self) -> str:
        p99 = f"{self.p99_seconds * 1000:.0f} ms ({self.p99_source})" if self.p99_seconds is not None else "n/a"
        return (f"{self.requests:.0f} requests, {self.errors_5xx:.0f} 5xx ({self.error_rate:.2%}), p99 latency {p99}"
                + (f", alarms firing: {', '.join(self.alarms_firing)}" if self.alarms_firing else ""))


def minute_of(when: datetime) -> str:
    """Return the ISO 8601 start (UTC) of the minute ``when`` falls in."""
    return when.astimezone(timezone.utc).replace(second=0, microsecond=0).isoformat()


class ServiceMetricsHook:
    def __init__(self, client: Any) -> None:
        self.client = client

    @classmethod
    def from_connection(cls, aws_conn_id: str | None, region_name: str | None = None) -> ServiceMetricsHook:
        from omnisphere_release.hooks.aws import aws_client

        return cls(aws_client("cloudwatch", aws_conn_id, region_name))

    def read(self, target_group: str, start: datetime, end: datetime, alarms: list[str]) -> MetricsWindow:
        dimensions = [{"Name": "TargetGroup", "Value": target_group}]

        def stats(metric: str, **kwargs: Any) -> list[dict[str, Any]]:
            return self.client.get_metric_statistics(Namespace=NAMESPACE, MetricName=metric, Dimensions=dimensions,
                                                     StartTime=start, EndTime=end, Period=60, **kwargs)["Datapoints"]

        request_points = stats("RequestCount", Statistics=["Sum"])
        error_points = stats("HTTPCode_Target_5XX_Count", Statistics=["Sum"])
        latency = stats("TargetResponseTime", ExtendedStatistics=["p99"], Statistics=["Maximum"])
        requests = sum(p.get("Sum", 0.0) for p in request_points)
        errors = sum(p.get("Sum", 0.0) for p in error_points)
        p99_values = [p["ExtendedStatistics"]["p99"] for p in latency if "p99" in p.get("ExtendedStatistics", {})]
        if p99_values:
            p99, source = max(p99_values), "p99"
        else:
            maxima = [p["Maximum"] for p in latency if "Maximum" in p]
            p99, source = (max(maxima), "Maximum") if maxima else (None, "none")
        firing: list[str] = []
        if alarms:
            response = self.client.describe_alarms(AlarmNames=alarms)
            firing = [a["AlarmName"] for a in response.get("MetricAlarms", []) if a.get("StateValue") == "ALARM"]
        return MetricsWindow(requests, errors, p99, source, firing,
                             per_minute(request_points, error_points, latency, source))


def per_minute(request_points: list[dict[str, Any]], error_points: list[dict[str, Any]],
               latency_points: list[dict[str, Any]], p99_source: str) -> tuple[MinuteReading, ...]:
    """Group 60 s datapoints by the minute they start in (an endpoint may not align them): sums add up, the p99 of
    a minute is its highest (the Maximum where the endpoint gives no percentile, as for the whole window)."""
    sums: dict[str, list[float]] = {}
    p99s: dict[str, float] = {}
    for points, index in ((request_points, 0), (error_points, 1)):
        for point in points:
            sums.setdefault(minute_of(point["Timestamp"]), [0.0, 0.0])[index] += point.get("Sum", 0.0)
    for point in latency_points:
        value = (point.get("ExtendedStatistics", {}).get("p99") if p99_source == "p99" else point.get("Maximum"))
        if value is not None:
            minute = minute_of(point["Timestamp"])
            p99s[minute] = max(p99s.get(minute, 0.0), value)
    minutes = sorted(set(sums) | set(p99s))
    return tuple(MinuteReading(m, sums.get(m, [0.0, 0.0])[0], sums.get(m, [0.0, 0.0])[1], p99s.get(m))
                 for m in minutes)


# ---- CloudWatch Logs -----------------------------------------------------------------------------------------------
def stream_label(image: str) -> str:
    """Return the ``awslogs-stream-prefix`` of the tasks that run ``image``: its digest (``sha256-`` and 16 hex
    digits), or its tag when it runs by tag. ':' is not allowed in a stream name."""
    reference, _, digest = image.partition("@")
    if digest:
        return digest.replace(":", "-")[:len("sha256-") + 16]
    name = reference.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else "latest"


def log_stream_prefix(image: str, container: str) -> str:
    """Return the stream name prefix of the tasks that run ``image`` in ``container``: ``<label>/<container>/``.

    ECS's awslogs driver names a task's stream ``<awslogs-stream-prefix>/<container>/<task id>``. Each task
    definition revision of a release names its image in its stream prefix (:func:`stream_label`), so that the
    streams of the new task set are told apart from the old one's while both run (a canary, a draining rolling
    update) without asking ECS for every task id.
    """
    return f"{stream_label(image)}/{container}/"


def one_line(message: str, limit: int = MAX_LINE_CHARS) -> str:
    """Make a log event quotable on one line: whitespace (a traceback's newlines) collapsed, cut at ``limit``."""
    text = re.sub(r"\s+", " ", message).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class LogScan:
    """The error lines found in the new task set's streams since the bake began."""

    streams: int  # streams of the new task set in the group (0: its tasks' logs are not reaching CloudWatch)
    count: int  # matching lines read, at most MAX_SCANNED_LINES
    samples: list[str] = field(default_factory=list)  # the first few, each on one line and cut to MAX_LINE_CHARS

    @property
    def capped(self) -> bool:
        return self.count >= MAX_SCANNED_LINES

    def describe(self) -> str:
        more = "at least " if self.capped else ""
        return f"{more}{self.count} error log line(s) in {self.streams} stream(s)"


class ServiceLogsHook:
    """Find error lines in a log group's streams through the amazon provider's AwsLogsHook."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @classmethod
    def from_connection(cls, aws_conn_id: str | None, region_name: str | None = None) -> ServiceLogsHook:
        # Imported here: the devstack imports this module for log_stream_prefix, and needs no Airflow for it.
        from airflow.providers.amazon.aws.hooks.logs import AwsLogsHook

        from omnisphere_release.hooks.aws import _RetryingConfig

        class RetryingLogsHook(_RetryingConfig, AwsLogsHook):
            """The amazon provider's CloudWatch Logs hook, with the release's retrying botocore config."""

        return cls(RetryingLogsHook(aws_conn_id=aws_conn_id, region_name=region_name).conn)

    def streams(self, log_group: str, prefix: str) -> list[str]:
        """Return the names of the streams of ``log_group`` that start with ``prefix``."""
        names: list[str] = []
        kwargs: dict[str, Any] = {"logGroupName": log_group, "logStreamNamePrefix": prefix}
        while True:
            response = self.client.describe_log_streams(**kwargs)
            names += [s["logStreamName"] for s in response.get("logStreams", [])]
            if not response.get("nextToken") or response["nextToken"] == kwargs.get("nextToken"):
                return names
            kwargs["nextToken"] = response["nextToken"]

    def error_lines(self, log_group: str, prefix: str, patterns: Iterable[str], start: datetime, end: datetime,
                    keep: int = 5) -> LogScan:
        """Count the lines of the streams under ``prefix`` between ``start`` and ``end`` that match any of the
        CloudWatch Logs filter ``patterns`` (a line matching two counts once); keep the first ``keep`` of them."""
        streams = self.streams(log_group, prefix)
        seen: dict[tuple[str, str], tuple[int, str]] = {}
        window = {"startTime": int(start.timestamp() * 1000), "endTime": int(end.timestamp() * 1000)}
        for pattern in patterns:
            for first in range(0, len(streams), STREAMS_PER_CALL):
                for event in self._events(log_group, streams[first:first + STREAMS_PER_CALL], pattern, window,
                                          MAX_SCANNED_LINES - len(seen)):
                    seen[(event["logStreamName"], event["eventId"])] = (event["timestamp"], event["message"])
                if len(seen) >= MAX_SCANNED_LINES:
                    break
        lines = sorted(seen.values())
        return LogScan(len(streams), len(lines), [one_line(message) for _, message in lines[:keep]])

    def _events(self, log_group: str, streams: list[str], pattern: str, window: dict[str, int],
                limit: int) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"logGroupName": log_group, "logStreamNames": streams, "filterPattern": pattern,
                                  **window}
        while len(events) < limit:
            response = self.client.filter_log_events(**kwargs, limit=min(10_000, limit - len(events)))
            events += response.get("events", [])
            if not response.get("nextToken") or response["nextToken"] == kwargs.get("nextToken"):
                break
            kwargs["nextToken"] = response["nextToken"]
        return events[:limit]
