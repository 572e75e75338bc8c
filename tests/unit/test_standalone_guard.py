"""The rules of operators/standalone.py that no e2e run reaches cheaply: how a later wave decides its window, and a
retry that keeps the backup its run took before the first change (a fake backup hook; nothing reaches S3)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException
from botocore.exceptions import ClientError

from omnisphere_release.catalog import load_catalog
from omnisphere_release.hooks.backups import BackupRecord
from omnisphere_release.operators import standalone
from omnisphere_release.operators.standalone import StandaloneApplyMigrationsOperator, backup_key, production_window

AUTH = load_catalog().get("auth-service")  # window: Sun 02:00-04:00 Europe/Paris, i.e. 01:00-03:00 UTC in December
TRIGGERED = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
SUNDAY_WINDOW = "2026-12-06T02:00:00+01:00"
RUN_ID = "manual__2026-12-01T12:00:00+00:00"


def utc(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=timezone.utc)


def test_next_is_decided_when_the_wave_starts():
    decision = production_window(AUTH, "next", "", utc(6, 1, 30), TRIGGERED)
    assert decision["window_start"] == utc(6, 1).isoformat() and decision["window_end"] == utc(6, 3).isoformat()


def test_a_fixed_start_is_decided_as_of_the_trigger_so_a_later_wave_goes_on_from_it():
    decision = production_window(AUTH, "now", "OPS-9: hotfix", utc(1, 14), TRIGGERED)
    assert datetime.fromisoformat(decision["window_start"]) == TRIGGERED and not decision.get("window_end")
    inside = production_window(AUTH, SUNDAY_WINDOW, "", utc(6, 2, 30), TRIGGERED)
    assert datetime.fromisoformat(inside["window_start"]) == utc(6, 1)


def test_a_wave_that_starts_after_its_chosen_window_closed_is_refused():
    with pytest.raises(AirflowFailException, match=r"auth-service .* closed at 2026-12-06T03:00:00\+00:00, before this "
                                                   r"change could start"):
        production_window(AUTH, SUNDAY_WINDOW, "", utc(6, 3, 30), TRIGGERED)


def test_window_now_without_force_reason_names_the_param():
    with pytest.raises(AirflowFailException, match="Refused, nothing was changed: param window=now needs param "
                                                   "force_reason"):
        production_window(AUTH, "now", " ", utc(1, 12), TRIGGERED)


class FakeBackupHook:
    """Say whether this run's backup exists (its sha256 tag), and record dumps instead of taking them."""

    def __init__(self, tagged: str | None) -> None:
        self.tagged = tagged
        self.dumps: list[tuple[str, str]] = []

    def check_destination(self, bucket: str) -> None:
        pass

    def recorded_sha256(self, bucket: str, key: str) -> str:
        if self.tagged is None:
            raise ClientError({"Error": {"Code": "NoSuchKey", "Message": "not found"}}, "GetObjectTagging")
        return self.tagged

    def dump_to_s3(self, bucket: str, key: str) -> BackupRecord:
        self.dumps.append((bucket, key))
        return BackupRecord(bucket, key, "f" * 64, 2048, 0.1, 0.1, 11)


@pytest.fixture()
def operator(monkeypatch) -> StandaloneApplyMigrationsOperator:
    monkeypatch.setenv(f"AIRFLOW_CONN_{AUTH.postgres_conn_id.upper()}", "postgres://auth:pw@127.0.0.1:9/auth")
    # The backup bucket is the Variable the catalog names for the run's environment (the default one here).
    monkeypatch.setenv("AIRFLOW_VAR_OMNI_BACKUP_BUCKET", "omni-backups")
    with DAG("schema_migrations", schedule=None):
        return StandaloneApplyMigrationsOperator(task_id="migrate_wave_1", service="auth-service")


def use_hook(monkeypatch, hook: FakeBackupHook) -> FakeBackupHook:
    monkeypatch.setattr(standalone.BackupHook, "for_service", classmethod(lambda cls, service: hook))
    return hook


def test_the_first_try_dumps_to_a_key_derived_from_the_run(operator, monkeypatch):
    hook = use_hook(monkeypatch, FakeBackupHook(tagged=None))
    backup = operator._back_up({"run_id": RUN_ID}, AUTH)  # type: ignore[arg-type]
    key = backup_key("auth-service", "schema_migrations", RUN_ID)
    assert key == "auth-service/manual__2026-12-01T12-00-00-00-00/schema_migrations.dump"
    assert hook.dumps == [("omni-backups", key)] and backup["uri"] == f"s3://omni-backups/{key}"


def test_a_retry_keeps_the_backup_taken_before_the_first_change(operator, monkeypatch):
    # The first try backed up, applied a migration and failed: dumping again would save the half-changed database
    # over the way back.
    hook = use_hook(monkeypatch, FakeBackupHook(tagged="a" * 64))
    backup = operator._back_up({"run_id": RUN_ID}, AUTH)  # type: ignore[arg-type]
    assert hook.dumps == []
    assert backup["sha256"] == "a" * 64 and backup["kept_from_earlier_try"] is True


def test_no_backup_bucket_is_refused_before_anything(operator, monkeypatch):
    hook = use_hook(monkeypatch, FakeBackupHook(tagged=None))
    monkeypatch.delenv("AIRFLOW_VAR_OMNI_BACKUP_BUCKET")
    with pytest.raises(AirflowFailException, match=r"Variable omni_backup_bucket \(the backup bucket of staging\) is not set"):
        operator._back_up({"run_id": RUN_ID}, AUTH)  # type: ignore[arg-type]
    assert hook.dumps == []
