"""The bake's log check and its record: the stream names the gate selects, how error lines are counted and quoted,
when they fail the bake, and the bake record the Releases page charts.

CloudWatch Logs is replaced by a fake client that answers like the real API (pages, per-stream event ids), so no test
reaches AWS or needs the Airflow database.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

import pytest

from omnisphere_release.catalog import MonitoringThresholds
from omnisphere_release.hooks.cloudwatch import (
    MAX_LINE_CHARS,
    LogScan,
    MetricsWindow,
    MinuteReading,
    ServiceLogsHook,
    log_stream_prefix,
    one_line,
    per_minute,
)
from omnisphere_release.operators.monitoring import bake_record
from omnisphere_release.triggers import monitoring as monitoring_trigger_module
from omnisphere_release.triggers.monitoring import MonitoringBakeTrigger, log_breach, merge_minutes

T0 = 1_760_000_010.0  # 2025-10-09T08:53:30Z: ten seconds into a minute, for the per-minute records
DIGEST = "sha256:" + "ab" * 32
IMAGE = f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/omnisphere/auth-service@{DIGEST}"


# --- which streams are the new task set's ---------------------------------------------------------------------
@pytest.mark.parametrize(("image", "prefix"), [
    (IMAGE, "sha256-abababababababab/auth/"),
    ("123456789012.dkr.ecr.eu-west-1.amazonaws.com/omnisphere/auth-service:2.4.1", "2.4.1/auth/"),
    ("registry:5000/omnisphere/auth-service:2.4.1-logerrors", "2.4.1-logerrors/auth/"),  # a port is not a tag
    ("omnisphere/auth-service", "latest/auth/"),
])
def test_the_stream_prefix_names_the_image_as_a_stream_name_may(image, prefix):
    assert log_stream_prefix(image, "auth") == prefix
    assert ":" not in prefix and "*" not in prefix  # characters CloudWatch Logs refuses in a stream name


def test_an_old_and_a_new_image_have_different_prefixes():
    old = log_stream_prefix(IMAGE.replace("ab", "cd"), "auth")
    assert not log_stream_prefix(IMAGE, "auth").startswith(old) and old != log_stream_prefix(IMAGE, "auth")


def test_a_quoted_line_is_one_line_and_cut_to_a_sane_length():
    assert one_line('Traceback (most recent call last):\n  File "x.py"\nValueError: bad') == \
        'Traceback (most recent call last): File "x.py" ValueError: bad'
    long = one_line("ERROR " + "x" * 5000)
    assert len(long) == MAX_LINE_CHARS and long.endswith("…")


# --- counting the error lines ---------------------------------------------------------------------------------
class FakeLogsClient:
    """Answers describe_log_streams and filter_log_events like CloudWatch Logs: prefix selection, pages of
    ``page`` items, event ids unique per stream, a pattern matching a plain term in the message."""

    def __init__(self, streams: dict[str, list[tuple[int, str]]], page: int = 2, fail: Exception | None = None):
        self.streams = streams
        self.page = page
        self.fail = fail
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def describe_log_streams(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("describe_log_streams", kwargs))
        if self.fail:
            raise self.fail
        names = sorted(n for n in self.streams if n.startswith(kwargs["logStreamNamePrefix"]))
        first = int(kwargs.get("nextToken") or 0)
        answer: dict[str, Any] = {"logStreams": [{"logStreamName": n} for n in names[first:first + self.page]]}
        if first + self.page < len(names):
            answer["nextToken"] = str(first + self.page)
        return answer

    def filter_log_events(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("filter_log_events", kwargs))
        term = kwargs["filterPattern"].strip('"')
        events = [{"logStreamName": name, "eventId": str(i), "timestamp": ts, "message": message}
                  for name in kwargs["logStreamNames"] for i, (ts, message) in enumerate(self.streams[name])
                  if term in message and kwargs["startTime"] <= ts <= kwargs["endTime"]]
        first = int(kwargs.get("nextToken") or 0)
        size = min(self.page, kwargs["limit"])
        answer: dict[str, Any] = {"events": events[first:first + size]}
        if first + size < len(events):
            answer["nextToken"] = str(first + size)
        return answer


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, timezone.utc)


def ms(seconds: float) -> int:
    return int((T0 + seconds) * 1000)


NEW = "sha256-abababababababab/auth/"
OLD = "sha256-cdcdcdcdcdcdcdcd/auth/"


def test_error_lines_counts_the_new_streams_matches_since_the_bake_began_and_keeps_the_first():
    client = FakeLogsClient({
        f"{NEW}task1": [(ms(-5), "ERROR before the bake"), (ms(1), "INFO ok"), (ms(2), "ERROR one"),
                        (ms(4), "Traceback (most recent call last):\n  ERROR two")],
        f"{NEW}task2": [(ms(3), "ERROR three"), (ms(5), "Traceback four")],
        f"{OLD}task9": [(ms(2), "ERROR from the old task set")],
    })

    scan = ServiceLogsHook(client).error_lines("/ecs/auth-service", NEW, ['"ERROR"', '"Traceback"'], at(0), at(10),
                                               keep=3)

    assert scan == LogScan(streams=2, count=4, samples=[
        "ERROR one", "ERROR three", "Traceback (most recent call last): ERROR two"])  # matched twice, counted once
    assert scan.describe() == "4 error log line(s) in 2 stream(s)"
    searched = [kwargs for name, kwargs in client.calls if name == "filter_log_events"]
    assert {tuple(k["logStreamNames"]) for k in searched} == {(f"{NEW}task1", f"{NEW}task2")}
    assert {k["startTime"] for k in searched} == {ms(0)}


def test_error_lines_asks_for_at_most_a_hundred_streams_at_a_time():
    client = FakeLogsClient({f"{NEW}task{i:03}": [(ms(1), "ERROR")] for i in range(230)}, page=50)

    scan = ServiceLogsHook(client).error_lines("/ecs/auth-service", NEW, ['"ERROR"'], at(0), at(10))

    assert (scan.streams, scan.count, len(scan.samples)) == (230, 230, 5)
    sizes = [len(k["logStreamNames"]) for name, k in client.calls if name == "filter_log_events" and
             "nextToken" not in k]
    assert sizes == [100, 100, 30]


def test_error_lines_stops_reading_at_its_limit(monkeypatch):
    from omnisphere_release.hooks import cloudwatch

    monkeypatch.setattr(cloudwatch, "MAX_SCANNED_LINES", 7)
    client = FakeLogsClient({f"{NEW}task1": [(ms(1), "ERROR") for _ in range(50)]}, page=3)

    scan = ServiceLogsHook(client).error_lines("/ecs/auth-service", NEW, ['"ERROR"', '"Traceback"'], at(0), at(10))

    assert scan.count == 7 and scan.capped and scan.describe().startswith("at least 7 ")


def test_no_stream_of_the_new_task_set_is_zero_streams_not_zero_errors_proven():
    scan = ServiceLogsHook(FakeLogsClient({f"{OLD}task1": [(ms(1), "ERROR")]})).error_lines(
        "/ecs/auth-service", NEW, ['"ERROR"'], at(0), at(10))
    assert (scan.streams, scan.count) == (0, 0)


# --- the decision ----------------------------------------------------------------------------------------------
def test_lines_up_to_the_limit_pass_and_one_more_fails_quoting_them():
    assert log_breach(LogScan(2, 2, ["ERROR a", "ERROR b"]), 2, "/ecs/a", NEW, ['"ERROR"']) is None
    reason = log_breach(LogScan(2, 3, ["ERROR a", "ERROR b", "ERROR c"]), 2, "/ecs/a", NEW, ['"ERROR"', '"FATAL"'])
    assert reason == (f'3 error log line(s) in 2 stream(s) of the new task set (/ecs/a, streams {NEW}*) match the '
                      f'error patterns "ERROR", "FATAL": more than the 2 allowed (monitoring.logs.max_error_lines); '
                      f"first lines: ERROR a | ERROR b | ERROR c")


# --- the trigger with the log check -----------------------------------------------------------------------------
class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class Hooks:
    """Both hooks of the trigger, scripted: each poll takes the next metrics window and the next log scan."""

    def __init__(self, windows: list[MetricsWindow | Exception], scans: list[LogScan | Exception]) -> None:
        self.windows, self.scans = list(windows), list(scans)

    def from_connection(self, aws_conn_id: str | None, region_name: str | None = None) -> Hooks:
        return self

    def read(self, *args: Any) -> MetricsWindow:
        answer = self.windows.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def error_lines(self, *args: Any) -> LogScan:
        answer = self.scans.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def window(requests: float = 1000, errors: float = 0, minute: float = 0) -> MetricsWindow:
    reading = MinuteReading(datetime.fromtimestamp(T0 + minute, timezone.utc).replace(second=0).isoformat(),
                            requests, errors, 0.2)
    return MetricsWindow(requests, errors, 0.2, "p99", [], (reading,))


def run_trigger(monkeypatch: pytest.MonkeyPatch, hooks: Hooks, **overrides: Any) -> dict[str, Any]:
    clock = Clock(T0)
    monkeypatch.setattr(monitoring_trigger_module, "time", clock)
    monkeypatch.setattr(monitoring_trigger_module.asyncio, "sleep", clock.sleep)
    monkeypatch.setattr(monitoring_trigger_module, "ServiceMetricsHook", hooks)
    monkeypatch.setattr(monitoring_trigger_module, "ServiceLogsHook", hooks)

    async def to_thread(function: Any, *args: Any) -> Any:
        return function(*args)

    monkeypatch.setattr(monitoring_trigger_module.asyncio, "to_thread", to_thread)
    arguments: dict[str, Any] = {
        "target_group": "targetgroup/auth/0123456789abcdef", "started_at": T0, "bake_until": T0 + 20,
        "max_error_rate": 0.01, "max_p99_ms": 1000, "missing_data_seconds": 25, "poll_seconds": 10,
        "log_group": "/ecs/auth-service", "log_stream_prefix": NEW, "log_patterns": ['"ERROR"'],
        "max_error_lines": 1, **overrides}

    async def first() -> dict[str, Any]:
        async for event in MonitoringBakeTrigger(**arguments).run():
            return event.payload
        raise AssertionError("no event")

    return asyncio.run(asyncio.wait_for(first(), timeout=5))


def test_the_bake_fails_on_error_lines_above_the_limit_and_carries_its_record(monkeypatch):
    event = run_trigger(monkeypatch, Hooks([window(), window()],
                                           [LogScan(2, 1, ["ERROR a"]), LogScan(2, 4, ["ERROR a", "ERROR b"])]))

    assert event["status"] == "breach"
    assert event["reason"].startswith("4 error log line(s) in 2 stream(s) of the new task set")
    assert event["log_errors"] == {"count": 4, "samples": ["ERROR a", "ERROR b"], "streams": 2}
    assert event["started_at"] == T0 and event["ended_at"] == T0 + 10
    assert [r["requests"] for r in event["readings"]] == [1000]


def test_the_bake_passes_with_error_lines_at_the_limit(monkeypatch):
    event = run_trigger(monkeypatch, Hooks([window()] * 3, [LogScan(2, 1, ["ERROR a"])] * 3))
    assert event["status"] == "success"
    assert event["last"].endswith("; 1 error log line(s) in 2 stream(s)")


def test_a_failed_log_read_is_polled_again_within_the_missing_data_budget(monkeypatch):
    event = run_trigger(monkeypatch, Hooks([window()] * 3, [RuntimeError("throttled"), LogScan(2, 0), LogScan(2, 0)]))
    assert event["status"] == "success"


def test_log_reads_that_keep_failing_end_the_bake_as_unreadable(monkeypatch):
    event = run_trigger(monkeypatch, Hooks([window()] * 5, [RuntimeError("AccessDenied")] * 5))
    assert event["status"] == "unreadable" and "AccessDenied" in event["reason"]


def test_no_stream_of_the_new_task_set_for_missing_data_is_a_failure(monkeypatch):
    event = run_trigger(monkeypatch, Hooks([window()] * 5, [LogScan(0, 0)] * 5), bake_until=T0 + 60)
    assert event["status"] == "no_data"
    assert event["reason"].startswith(f"no log stream {NEW}* in log group /ecs/auth-service for 30s")


def test_without_a_log_group_the_logs_are_not_read(monkeypatch):
    event = run_trigger(monkeypatch, Hooks([window()] * 3, []), log_group=None, log_stream_prefix=None,
                        log_patterns=None)
    assert event["status"] == "success" and event["log_errors"] is None


# --- the per-minute readings and the bake record ----------------------------------------------------------------
def test_datapoints_are_grouped_by_the_minute_they_start_in():
    t = datetime(2026, 11, 26, 17, 5, 12, tzinfo=timezone.utc)
    later = t.replace(minute=6, second=3)
    minutes = per_minute([{"Timestamp": t, "Sum": 100.0}, {"Timestamp": t.replace(second=50), "Sum": 20.0},
                          {"Timestamp": later, "Sum": 50.0}],
                         [{"Timestamp": t, "Sum": 3.0}],
                         [{"Timestamp": t, "Maximum": 0.4}, {"Timestamp": t.replace(second=40), "Maximum": 0.9}],
                         "Maximum")
    assert minutes == (MinuteReading("2026-11-26T17:05:00+00:00", 120.0, 3.0, 0.9),
                       MinuteReading("2026-11-26T17:06:00+00:00", 50.0, 0.0, None))


def test_the_fullest_reading_of_a_minute_is_kept():
    readings: dict[str, dict[str, Any]] = {}
    merge_minutes(readings, (MinuteReading("m1", 100, 1, 0.2),))
    merge_minutes(readings, (MinuteReading("m1", 40, 0, 0.1), MinuteReading("m2", 10, 0, None)))
    assert readings == {"m1": {"minute": "m1", "requests": 100, "errors_5xx": 1, "p99_seconds": 0.2},
                        "m2": {"minute": "m2", "requests": 10, "errors_5xx": 0, "p99_seconds": None}}


THRESHOLDS = MonitoringThresholds(target_group="targetgroup/auth/0123456789abcdef", max_error_rate=0.02,
                                  max_p99_latency_ms=800, missing_data_minutes=3)


def test_the_bake_record_has_a_reading_for_every_minute_and_nulls_where_nothing_was_seen():
    event = {"status": "breach", "reason": "5xx error rate 30.00% ...", "started_at": T0, "ended_at": T0 + 150,
             "readings": [{"minute": "2025-10-09T08:53:00+00:00", "requests": 200.0, "errors_5xx": 60.0,
                           "p99_seconds": 0.25},
                          {"minute": "2025-10-09T08:55:00+00:00", "requests": 0.0, "errors_5xx": 0.0,
                           "p99_seconds": None}],
             "log_errors": {"count": 2, "samples": ["ERROR a", "ERROR b"], "streams": 2}}

    record = bake_record(event, THRESHOLDS)

    assert record == {
        "started_at": "2025-10-09T08:53:30+00:00", "ended_at": "2025-10-09T08:56:00+00:00",
        "thresholds": {"max_error_rate": 0.02, "max_p99_latency_ms": 800, "missing_data_minutes": 3.0},
        "readings": [
            {"minute": "2025-10-09T08:53:00+00:00", "error_rate": 0.3, "p99_ms": 250.0, "requests": 200},
            {"minute": "2025-10-09T08:54:00+00:00", "error_rate": None, "p99_ms": None, "requests": None},
            {"minute": "2025-10-09T08:55:00+00:00", "error_rate": None, "p99_ms": None, "requests": 0},
            {"minute": "2025-10-09T08:56:00+00:00", "error_rate": None, "p99_ms": None, "requests": None}],
        "failed_at": "2025-10-09T08:56:00+00:00", "verdict": "failed", "reason": "5xx error rate 30.00% ...",
        "steps": [], "log_errors": {"count": 2, "samples": ["ERROR a", "ERROR b"]}}


def test_a_passed_bake_has_no_failure_and_a_bake_without_log_check_says_so_with_null():
    record = bake_record({"status": "success", "started_at": T0, "ended_at": T0 + 5, "readings": [],
                          "log_errors": None}, THRESHOLDS)
    assert (record["verdict"], record["failed_at"], record["reason"], record["log_errors"]) == (
        "passed", None, None, None)
    assert [r["minute"] for r in record["readings"]] == ["2025-10-09T08:53:00+00:00"]


def test_the_record_is_what_the_releases_page_charts():
    from omnisphere_release.ui.bake import check_bake

    check_bake(bake_record({"status": "no_data", "reason": "no requests", "started_at": T0, "ended_at": T0 + 90,
                            "readings": [], "log_errors": None}, THRESHOLDS))
