"""The command lines refuse a change without --reason (exit 2, naming the flag) before they reach a database; reading
(plan, status, a dry run, a pause request) needs none. No database here: the DSN variables are unset, so a command
that passes the rule stops at the next check, which says so."""

from __future__ import annotations

import pytest

from omnisphere_release.datamigrate.__main__ import main as datamigrate
from omnisphere_release.migrations.__main__ import main as migrate

DATA_MIGRATION = ["billing-service", "backfill_invoice_due_dates"]


@pytest.fixture(autouse=True)
def no_database(monkeypatch):
    for service in ("AUTH_SERVICE", "BILLING_SERVICE", "NOTIFICATION_SERVICE"):
        monkeypatch.delenv(f"OMNI_PG_DSN_{service}", raising=False)


@pytest.mark.parametrize("argv", [
    ["auth-service", "up"],
    ["auth-service", "down", "--to", "0"],
    ["all", "up"],
    ["all", "down"],
    ["auth-service", "up", "--reason", "   "],
    ["auth-service", "resolve", "--version", "5", "--as", "applied"],
    ["auth-service", "resolve", "--version", "5", "--as", "applied", "--reason", " ", "--dry-run"],
])
def test_omni_migrate_refuses_a_change_without_a_reason(capsys, argv):
    assert migrate(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("refused: ") and "--reason" in err
    assert "OMNI_PG_DSN" not in err  # refused before it looked for a database


@pytest.mark.parametrize("argv", [
    ["auth-service", "up", "--reason", "ticket OPS-12"],
    ["auth-service", "down", "--to", "2", "--reason", "revert tokens"],
    ["auth-service", "resolve", "--version", "5", "--as", "reverted", "--reason", "checked by hand"],
    ["auth-service", "plan"],
    ["auth-service", "plan", "--direction", "down"],
    ["auth-service", "status"],
    ["all", "status"],
    ["auth-service", "up", "--dry-run"],
    ["auth-service", "down", "--dry-run"],
])
def test_omni_migrate_reads_and_reasoned_changes_pass_the_rule(capsys, argv):
    assert migrate(argv) == 2
    err = capsys.readouterr().err
    assert "--reason" not in err and "OMNI_PG_DSN_AUTH_SERVICE is not set" in err


def test_omni_migrate_names_an_unknown_service_before_the_missing_reason(capsys):
    assert migrate(["payments-service", "up"]) == 2
    assert "unknown service 'payments-service'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    [*DATA_MIGRATION, "run"],
    [*DATA_MIGRATION, "revert"],
    [*DATA_MIGRATION, "run", "--reason", ""],
    [*DATA_MIGRATION, "run", "--max-batches", "1"],
])
def test_datamigrate_refuses_a_change_without_a_reason(capsys, argv):
    assert datamigrate(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("refused: ") and "--reason" in err and "OMNI_PG_DSN" not in err


@pytest.mark.parametrize("argv", [
    [*DATA_MIGRATION, "run", "--reason", "OPS-7: backfill"],
    [*DATA_MIGRATION, "revert", "--reason", "OPS-7: undo"],
    [*DATA_MIGRATION, "pause"],
    [*DATA_MIGRATION, "status"],
])
def test_datamigrate_pause_status_and_reasoned_changes_pass_the_rule(capsys, argv):
    assert datamigrate(argv) == 2
    err = capsys.readouterr().err
    assert "--reason" not in err and "OMNI_PG_DSN_BILLING_SERVICE is not set" in err


def test_the_reason_is_a_documented_flag(capsys):
    with pytest.raises(SystemExit):
        migrate(["--help"])
    assert "--reason" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        datamigrate(["--help"])
    assert "--reason" in capsys.readouterr().out
