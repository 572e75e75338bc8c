"""Maintenance windows across midnight and daylight-saving changes, and the timetable that schedules them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from omnisphere_release.windows import WindowSchedule

PARIS = ZoneInfo("Europe/Paris")
UTC = timezone.utc


def local(*args: int) -> datetime:
    return datetime(*args, tzinfo=PARIS)


def test_summary_reads_like_people_say_it():
    assert WindowSchedule("0 2 * * SUN", timedelta(hours=2), "Europe/Paris").summary() == "Sun 02:00-04:00 Europe/Paris"
    assert WindowSchedule("30 1 * * *", timedelta(hours=1), "UTC").summary() == "Daily 01:30-02:30 UTC"
    assert WindowSchedule("0 23 * * 5", timedelta(hours=3), "UTC").summary() == "Fri 23:00-02:00 (+1d) UTC"


def test_window_across_midnight():
    schedule = WindowSchedule("0 23 * * *", timedelta(hours=3), "Europe/Paris")
    window = schedule.window_at(local(2026, 6, 10, 1, 30))
    assert window is not None
    assert window.start == local(2026, 6, 9, 23, 0) and window.end == local(2026, 6, 10, 2, 0)
    assert schedule.window_at(local(2026, 6, 10, 2, 0)) is None  # the end is exclusive
    assert schedule.next_window(local(2026, 6, 10, 2, 0)).start == local(2026, 6, 10, 23, 0)


def test_spring_forward_starts_at_the_jump_and_keeps_its_duration():
    # 2026-03-29: in Paris the clocks jump from 02:00 to 03:00; 02:30 does not exist that night.
    schedule = WindowSchedule("30 2 * * *", timedelta(hours=1), "Europe/Paris")
    window = schedule.next_window(local(2026, 3, 29, 0, 0))
    assert window.start == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST, the first instant that exists
    assert window.end - window.start == timedelta(hours=1)
    following = schedule.next_window(window.start + timedelta(minutes=1))
    assert following.start == local(2026, 3, 30, 2, 30)


def test_fall_back_uses_the_first_of_the_repeated_times():
    # 2026-10-25: in Paris 02:00-03:00 happens twice.
    schedule = WindowSchedule("30 2 * * SUN", timedelta(hours=2), "Europe/Paris")
    window = schedule.next_window(local(2026, 10, 24, 12, 0))
    assert window.start == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST, the first one
    assert window.end == datetime(2026, 10, 25, 2, 30, tzinfo=UTC)  # two real hours later (03:30 CET)


def test_window_open_now_and_remaining_time():
    schedule = WindowSchedule("0 2 * * SUN", timedelta(hours=2), "Europe/Paris")
    at = local(2026, 11, 29, 3, 15)
    window = schedule.window_at(at)
    assert window is not None and window.remaining(at) == timedelta(minutes=45)
    assert schedule.window_at(local(2026, 11, 30, 3, 15)) is None


@pytest.mark.parametrize("bad", ["every sunday", "0 2 * *"])
def test_invalid_cron_is_refused(bad):
    with pytest.raises(ValueError, match="cron"):
        WindowSchedule(bad, timedelta(hours=1), "UTC")


def test_timetable_schedules_windows_without_replaying_missed_ones():
    from airflow.timetables.base import DataInterval, TimeRestriction

    from omnisphere_release.timetables import MaintenanceWindowTimetable

    timetable = MaintenanceWindowTimetable("0 2 * * SUN", 120, "Europe/Paris")
    assert timetable.summary == "Sun 02:00-04:00 Europe/Paris"
    restriction = TimeRestriction(earliest=datetime(2026, 1, 1, tzinfo=UTC), latest=None, catchup=True)
    first = timetable.next_dagrun_info(last_automated_data_interval=None, restriction=restriction)
    assert first.data_interval.start == local(2026, 1, 4, 2, 0)
    assert first.data_interval.end == local(2026, 1, 4, 4, 0)
    second = timetable.next_dagrun_info(last_automated_data_interval=first.data_interval, restriction=restriction)
    assert second.data_interval.start == local(2026, 1, 11, 2, 0)
    no_catchup = TimeRestriction(earliest=datetime(2020, 1, 1, tzinfo=UTC), latest=None, catchup=False)
    upcoming = timetable.next_dagrun_info(last_automated_data_interval=DataInterval(
        local(2021, 1, 3, 2, 0), local(2021, 1, 3, 4, 0)), restriction=no_catchup)
    assert upcoming.data_interval.end > datetime.now(UTC)  # not a 2021 window
    manual = timetable.infer_manual_data_interval(run_after=local(2026, 1, 4, 3, 0))
    assert (manual.start, manual.end) == (local(2026, 1, 4, 2, 0), local(2026, 1, 4, 4, 0))


def test_a_dag_with_the_timetable_round_trips_serialization():
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    from omnisphere_release.timetables import MaintenanceWindowTimetable

    timetable = MaintenanceWindowTimetable("0 3 * * TUE", 90, "Europe/Paris")
    with DAG("windowed", schedule=timetable, start_date=datetime(2026, 1, 1, tzinfo=UTC), catchup=False) as dag:
        pass
    restored = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    assert isinstance(restored.timetable, MaintenanceWindowTimetable)
    assert restored.timetable == timetable
    assert restored.timetable.summary == "Tue 03:00-04:30 Europe/Paris"
