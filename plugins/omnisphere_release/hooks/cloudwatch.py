"""Read a service's load balancer metrics and alarms from CloudWatch."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

NAMESPACE = "AWS/ApplicationELB"


@dataclass(frozen=True)
class MetricsWindow:
    requests: float
    errors_5xx: float
    p99_seconds: float | None
    p99_source: str  # "p99", or "Maximum" when the endpoint returns no percentile (stricter than p99)
    alarms_firing: list[str]

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

        requests = sum(p.get("Sum", 0.0) for p in stats("RequestCount", Statistics=["Sum"]))
        errors = sum(p.get("Sum", 0.0) for p in stats("HTTPCode_Target_5XX_Count", Statistics=["Sum"]))
        latency = stats("TargetResponseTime", ExtendedStatistics=["p99"], Statistics=["Maximum"])
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
        return MetricsWindow(requests, errors, p99, source, firing)
