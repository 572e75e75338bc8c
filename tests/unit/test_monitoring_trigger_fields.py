"""The bake and steps triggers' serialized form is a contract with the rows already in the trigger table.

A deferred monitoring_gate is stored as (classpath, kwargs) and rebuilt by the triggerer, possibly by a newer or an
older release of this code: a key renamed, dropped or added, or a default changed, breaks a running bake on upgrade or
on rollback of the orchestrator. The literals below are what the code wrote before the triggers shared their fields
(commit 9ea8598); they must not change without a migration of the stored rows.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import pytest

from omnisphere_release.triggers.monitoring import DeploymentStepsTrigger, MonitoringBakeTrigger

BAKE = "omnisphere_release.triggers.monitoring.MonitoringBakeTrigger"
STEPS = "omnisphere_release.triggers.monitoring.DeploymentStepsTrigger"

# Exactly the keys each trigger writes today (the constructor's parameters, every one of them).
BAKE_KEYS = {"target_group", "started_at", "bake_until", "max_error_rate", "max_p99_ms", "missing_data_seconds",
             "alarms", "aws_conn_id", "region_name", "poll_seconds", "window_seconds", "allow_missing_data",
             "window_closes_at", "log_group", "log_stream_prefix", "log_patterns", "max_error_lines"}
STEPS_KEYS = {"deployment_arn", "steps", "production_target_group", "new_target_group", "max_error_rate",
              "max_p99_ms", "missing_data_seconds", "deadline", "alarms", "aws_conn_id", "region_name",
              "poll_seconds", "window_closes_at", "log_group", "log_stream_prefix", "log_patterns", "max_error_lines",
              "late_bake_seconds", "first_share_after"}

# The required arguments of each trigger, and the row today's code writes for them (so every default is pinned).
BAKE_REQUIRED: dict[str, Any] = {"target_group": "tg", "started_at": 1.0, "bake_until": 2.0, "max_error_rate": 0.01,
                                 "max_p99_ms": 500.0, "missing_data_seconds": 60.0}
BAKE_DEFAULT_ROW: dict[str, Any] = {
    **BAKE_REQUIRED, "alarms": [], "aws_conn_id": "aws_default", "region_name": None, "poll_seconds": 10.0,
    "window_seconds": 120.0, "allow_missing_data": False, "window_closes_at": None, "log_group": None,
    "log_stream_prefix": None, "log_patterns": [], "max_error_lines": 0}
STEPS_REQUIRED: dict[str, Any] = {"deployment_arn": "arn", "steps": [{"percent": 10.0, "bake_minutes": 1}],
                                  "production_target_group": "p", "new_target_group": "n", "max_error_rate": 0.01,
                                  "max_p99_ms": 500.0, "missing_data_seconds": 60.0, "deadline": 3.0}
STEPS_DEFAULT_ROW: dict[str, Any] = {
    **STEPS_REQUIRED, "alarms": [], "aws_conn_id": "aws_default", "region_name": None, "poll_seconds": 10.0,
    "window_closes_at": None, "log_group": None, "log_stream_prefix": None, "log_patterns": [], "max_error_lines": 0,
    "late_bake_seconds": 0.0, "first_share_after": None}

# A value other than the default (and other than the required example above) for every argument.
BAKE_GIVEN: dict[str, Any] = {
    "target_group": "targetgroup/auth/0123456789abcdef", "started_at": 1_760_000_000.5, "bake_until": 1_760_000_600.5,
    "max_error_rate": 0.025, "max_p99_ms": 750.0, "missing_data_seconds": 90.0,
    "alarms": ["auth-5xx", "auth-latency"], "aws_conn_id": "aws_release", "region_name": "eu-west-1",
    "poll_seconds": 15.0, "window_seconds": 180.0, "allow_missing_data": True, "window_closes_at": 1_760_001_800.0,
    "log_group": "/ecs/auth-service", "log_stream_prefix": "sha256-0123456789abcdef/auth/",
    "log_patterns": ['"ERROR"', '"Traceback"'], "max_error_lines": 3}
STEPS_GIVEN: dict[str, Any] = {
    "deployment_arn": "arn:aws:ecs:eu-west-1:123456789012:service-deployment/omnisphere/auth-service/abc123",
    "steps": [{"percent": 25.0, "bake_minutes": 2}, {"percent": 100.0, "bake_minutes": 3}],
    "production_target_group": "targetgroup/auth/0123456789abcdef",
    "new_target_group": "targetgroup/auth-green/fedcba9876543210", "max_error_rate": 0.03, "max_p99_ms": 800.0,
    "missing_data_seconds": 45.0, "deadline": 1_760_003_600.0, "alarms": ["auth-5xx"], "aws_conn_id": "aws_release",
    "region_name": "us-east-2", "poll_seconds": 5.0, "window_closes_at": 1_760_001_800.0,
    "log_group": "/ecs/auth-service", "log_stream_prefix": "sha256-ab/auth/", "log_patterns": ['"ERROR"'],
    "max_error_lines": 7, "late_bake_seconds": 360.0, "first_share_after": 1_759_999_950.0}

CASES = [
    pytest.param(MonitoringBakeTrigger, BAKE, BAKE_KEYS, BAKE_REQUIRED, BAKE_DEFAULT_ROW, BAKE_GIVEN, id="bake"),
    pytest.param(DeploymentStepsTrigger, STEPS, STEPS_KEYS, STEPS_REQUIRED, STEPS_DEFAULT_ROW, STEPS_GIVEN,
                 id="steps"),
]


def rebuild(classpath: str, kwargs: dict[str, Any]) -> Any:
    """Rebuild a trigger as the triggerer does: import the class its classpath names, call it with the kwargs."""
    module_name, class_name = classpath.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)(**kwargs)


@pytest.mark.parametrize(("cls", "classpath", "keys", "required", "default_row", "given"), CASES)
def test_the_serialized_keys_are_exactly_todays(cls, classpath, keys, required, default_row, given):
    assert set(default_row) == keys and set(given) == keys  # the literals themselves cover every key
    assert cls(**required).serialize() == (classpath, default_row)
    assert set(cls(**given).serialize()[1]) == keys


@pytest.mark.parametrize(("cls", "classpath", "keys", "required", "default_row", "given"), CASES)
def test_a_trigger_with_every_argument_set_survives_the_trigger_table(cls, classpath, keys, required, default_row,
                                                                     given):
    assert [key for key in keys if given[key] == default_row[key]] == []  # each value differs from its default
    written = cls(**given).serialize()
    assert written == (classpath, given)
    # The triggerer stores the kwargs as JSON and rebuilds the trigger from the classpath in another process.
    stored_classpath, stored_kwargs = json.loads(json.dumps(written))
    again = rebuild(stored_classpath, stored_kwargs)
    assert type(again) is cls
    assert again.serialize() == written


@pytest.mark.parametrize(("cls", "classpath", "keys", "required", "default_row", "given"), CASES)
def test_a_row_written_with_the_defaults_is_read_back_unchanged(cls, classpath, keys, required, default_row, given):
    assert rebuild(classpath, json.loads(json.dumps(default_row))).serialize() == (classpath, default_row)


def test_a_steps_row_written_before_late_bake_seconds_existed_is_read_with_no_late_bake():
    """A trigger deferred by the previous version, resumed by a triggerer running this one."""
    older = {key: value for key, value in STEPS_DEFAULT_ROW.items()
             if key not in ("late_bake_seconds", "first_share_after")}
    rebuilt = rebuild(STEPS, older)
    assert (rebuilt.late_bake_seconds, rebuilt.first_share_after) == (0.0, None)


def test_the_constructors_copy_what_they_are_given_and_read_none_as_empty():
    alarms, patterns = ["auth-5xx"], ['"ERROR"']
    bake = MonitoringBakeTrigger(**{**BAKE_REQUIRED, "alarms": alarms, "log_patterns": patterns})
    alarms.append("later")
    patterns.append("later")
    assert (bake.alarms, bake.log_patterns) == (["auth-5xx"], ['"ERROR"'])
    assert MonitoringBakeTrigger(**{**BAKE_REQUIRED, "alarms": ("a", "b")}).alarms == ["a", "b"]

    steps = [{"percent": 10.0, "bake_minutes": 1}]
    stepped = DeploymentStepsTrigger(**{**STEPS_REQUIRED, "steps": steps, "alarms": None, "log_patterns": None})
    steps[0]["percent"] = 50.0
    steps.append({"percent": 100.0, "bake_minutes": 1})
    assert stepped.steps == [{"percent": 10.0, "bake_minutes": 1}]
    assert (stepped.alarms, stepped.log_patterns) == ([], [])
