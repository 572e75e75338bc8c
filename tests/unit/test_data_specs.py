"""Data migration specs are refused before anything runs, naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from omnisphere_release.datamigrate import DataSpecError, discover_specs, load_spec

REPO = Path(__file__).resolve().parents[2]
GOOD = {
    "table": "events", "key": "id", "batch_size": 100,
    "statement": "INSERT INTO events_v2 SELECT * FROM events WHERE id > :last_key AND id <= :upper_key",
    "verify": "SELECT true", "reversible": True,
    "revert": "DELETE FROM events_v2 WHERE id > :last_key AND id <= :upper_key",
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "copy_events.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_project_specs_load():
    specs = discover_specs(REPO / "include" / "sql" / "billing-service" / "data")
    assert [s.name for s in specs] == ["backfill_invoice_due_dates"]
    assert not specs[0].reversible


def test_placeholders_become_bound_parameters_and_percent_signs_survive(tmp_path):
    spec = load_spec(write(tmp_path, {**GOOD, "statement": GOOD["statement"] + " AND note LIKE '50%'"}))
    bound = spec.bind(spec.statement)
    assert "%(last_key)s" in bound and "%(upper_key)s" in bound and "'50%%'" in bound
    assert ":last_key" not in bound


@pytest.mark.parametrize(("change", "message"), [
    ({"key": None}, "field key: required"),
    ({"table": "events; drop table x"}, "field table: .* is not a plain SQL identifier"),
    ({"statement": "UPDATE events SET x = 1 WHERE id > :last_key"}, "field statement: must use :upper_key"),
    ({"statement": "UPDATE events SET x = 1"}, "field statement: must use :last_key and :upper_key"),
    ({"revert": None}, "field revert: required when reversible is true"),
    ({"batch_size": 0}, "field batch_size"),
    ({"throttle": {"rows_per_sec": 5}}, "field throttle"),
    ({"colour": "blue"}, "field colour: unknown key"),
])
def test_bad_specs_are_refused(tmp_path, change, message):
    data = {**GOOD, **change}
    data = {k: v for k, v in data.items() if v is not None}
    path = write(tmp_path, data)
    with pytest.raises(DataSpecError, match=message) as err:
        load_spec(path)
    assert str(path) in str(err.value)
