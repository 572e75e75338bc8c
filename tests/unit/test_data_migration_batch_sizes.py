"""Batch sizes adapt to the spec's target duration and never leave the spec's bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from omnisphere_release.datamigrate import BatchSizer, DataSpecError, load_spec

SPEC = {
    "table": "events", "key": "id",
    "statement": "INSERT INTO events_v2 SELECT * FROM events WHERE id > :last_key AND id <= :upper_key",
    "verify": "SELECT true",
}


def sizes(sizer: BatchSizer, keys_per_second: float, batches: int) -> list[int]:
    """Run ``batches`` batches against a database that does ``keys_per_second``; return the sizes asked for."""
    asked = []
    for _ in range(batches):
        asked.append(sizer.size)
        sizer.observe(sizer.size / keys_per_second)
    return asked


def test_sizes_converge_on_the_target_duration():
    sizer = BatchSizer(first=1000, smallest=100, largest=1_000_000, target_seconds=0.5)
    asked = sizes(sizer, keys_per_second=100_000, batches=12)
    # at most doubling per batch: 1000, 2000, ... then 50,000 keys take the 0.5 s target
    assert asked[:6] == [1000, 2000, 4000, 8000, 16000, 32000]
    assert asked[-3:] == [50_000, 50_000, 50_000]


def test_sizes_never_exceed_the_maximum_however_fast_the_database():
    sizer = BatchSizer(first=1000, smallest=100, largest=5000, target_seconds=0.5)
    asked = sizes(sizer, keys_per_second=10_000_000, batches=20)
    assert max(asked) == 5000 and asked[-1] == 5000


def test_sizes_never_go_below_the_minimum_however_slow_the_database():
    sizer = BatchSizer(first=1000, smallest=300, largest=5000, target_seconds=0.5)
    asked = sizes(sizer, keys_per_second=10, batches=20)
    # at most halving per batch: one slow batch does not swing the size to the floor at once
    assert asked[:3] == [1000, 500, 300]
    assert min(asked) == 300 and asked[-1] == 300


def test_one_slow_batch_halves_the_next_at_most_and_the_size_recovers():
    sizer = BatchSizer(first=40_000, smallest=100, largest=100_000, target_seconds=0.5)
    sizer.observe(30.0)  # a checkpoint or a lock wait stalled one batch
    assert sizer.size == 20_000
    sizer.observe(0.25)
    assert sizer.size == 40_000


def test_the_first_size_is_held_within_the_bounds():
    assert BatchSizer(first=50, smallest=100, largest=5000, target_seconds=0.5).size == 100
    assert BatchSizer(first=9000, smallest=100, largest=5000, target_seconds=0.5).size == 5000


def test_a_target_of_zero_keeps_every_batch_at_its_size():
    sizer = BatchSizer(first=100, smallest=100, largest=100, target_seconds=0)
    assert sizes(sizer, keys_per_second=1_000_000, batches=5) == [100] * 5
    sizer.shrink()
    assert sizer.size == 100


def test_a_lock_timeout_halves_the_next_batch_within_the_minimum():
    sizer = BatchSizer(first=1000, smallest=300, largest=5000, target_seconds=0.5)
    sizer.shrink()
    assert sizer.size == 500
    sizer.shrink()
    assert sizer.size == 300


def write(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "copy_events.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **fields}))
    return path


def test_the_spec_bounds_default_to_a_tenth_and_ten_times_the_first_size(tmp_path):
    spec = load_spec(write(tmp_path, batch_size=5000))
    assert (spec.batch_size, spec.min_batch_size, spec.max_batch_size, spec.batch_seconds) == (5000, 500, 50_000, 0.5)
    small = load_spec(write(tmp_path, batch_size=5))
    assert (small.min_batch_size, small.max_batch_size) == (1, 50)
    large = load_spec(write(tmp_path, batch_size=500_000))
    assert large.max_batch_size == 1_000_000  # one transaction never walks more than a million keys


def test_batch_seconds_zero_means_a_fixed_size(tmp_path):
    spec = load_spec(write(tmp_path, batch_size=100, batch_seconds=0))
    assert (spec.min_batch_size, spec.max_batch_size) == (100, 100)


@pytest.mark.parametrize(("fields", "message"), [
    ({"batch_size": 100, "min_batch_size": 200}, r"field min_batch_size: 200 is not a number between 1 and 100"),
    ({"batch_size": 100, "max_batch_size": 50}, r"field max_batch_size: 50 is not a number between 100 and 1000000"),
    ({"batch_size": 100, "batch_seconds": -1}, r"field batch_seconds: -1 is not a number between 0 and 60"),
    ({"batch_size": 100, "batch_seconds": "fast"}, r"field batch_seconds: 'fast' is not a number"),
    ({"batch_size": 100, "batch_seconds": 0, "max_batch_size": 1000},
     r"field batch_seconds: 0 means every batch is batch_size \(100\); give a target duration"),
])
def test_bad_bounds_are_refused_naming_the_field(tmp_path, fields, message):
    path = write(tmp_path, **fields)
    with pytest.raises(DataSpecError, match=message) as refused:
        load_spec(path)
    assert str(path) in str(refused.value)
