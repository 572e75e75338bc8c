"""The release queue: which window a manifest goes to, and what a scheduled release_all takes from it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from omnisphere_release.checks import queued_window_start
from omnisphere_release.release_queue import queue_manifest, take_manifest, window_key
from omnisphere_release.windows import WindowSchedule

PARIS = ZoneInfo("Europe/Paris")
SCHEDULE = WindowSchedule("0 2 * * SUN", timedelta(hours=3), "Europe/Paris")
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)  # a Wednesday


def test_next_is_the_coming_window_and_an_explicit_start_must_be_a_window_start():
    assert queued_window_start(SCHEDULE, "next", NOW) == datetime(2026, 11, 29, 2, 0, tzinfo=PARIS)
    later = queued_window_start(SCHEDULE, "2026-12-06T02:00:00+01:00", NOW)
    assert later == datetime(2026, 12, 6, 2, 0, tzinfo=PARIS)
    with pytest.raises(ValueError, match="not the start of a release window"):
        queued_window_start(SCHEDULE, "2026-12-06T03:00:00+01:00", NOW)
    with pytest.raises(ValueError, match="already started"):
        queued_window_start(SCHEDULE, "2026-11-22T02:00:00+01:00", NOW)
    with pytest.raises(ValueError, match="time zone"):
        queued_window_start(SCHEDULE, "2026-12-06T02:00:00", NOW)


def test_a_window_takes_its_own_manifest_and_forgets_older_ones():
    first = datetime(2026, 11, 29, 2, 0, tzinfo=PARIS)
    second = datetime(2026, 12, 6, 2, 0, tzinfo=PARIS)
    queue = queue_manifest({}, first, {"manifest": {"auth-service": "1.0"}})
    queue = queue_manifest(queue, second, {"manifest": {"billing-service": "2.0"}})
    queue = queue_manifest(queue, first, {"manifest": {"auth-service": "1.1"}})  # replaces
    taken, rest = take_manifest(queue, first)
    assert taken == {"manifest": {"auth-service": "1.1"}}
    assert list(rest) == [window_key(second)]
    nothing, rest_after = take_manifest(rest, datetime(2026, 11, 29, 2, 0, tzinfo=PARIS))
    assert nothing is None and rest_after == rest
    taken, empty = take_manifest(rest, second + timedelta(days=7))  # a missed window is dropped, not replayed
    assert taken is None and empty == {}
