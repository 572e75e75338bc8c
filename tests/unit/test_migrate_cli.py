"""omni-migrate's help and argument checks: the actions a team adopting a service needs, with their exit codes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from omnisphere_release.migrations.__main__ import build_parser, main


def test_help_lists_every_action_and_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: omni-migrate")
    for action in ("plan", "status", "up", "down", "resolve", "baseline", "adopt", "new NAME"):
        assert f"\n  {action} " in text, action
    assert "--all reverts everything, version 0 included" in text
    for code in ("0  done", "1  failed while running", "2  bad input or refused, nothing changed"):
        assert code in text


@pytest.mark.parametrize(("argv", "message"), [
    (["auth-service", "baseline", "--reason", "x"], "baseline needs --version N"),
    (["all", "adopt", "--reason", "x"], "adopt takes one service, not 'all'"),
    (["auth-service", "new"], "new needs the migration's name"),
    (["auth-service", "up", "add_x", "--reason", "x"], "only `new` takes a name"),
    (["auth-service", "up", "--all", "--reason", "x"], "--all goes with down alone"),
    (["auth-service", "down", "--all", "--to", "2", "--reason", "x"], "--all goes with down alone"),
    (["auth-service", "baseline", "--version", "3"], "baseline changes the schema: give --reason"),
])
def test_arguments_that_do_not_fit_the_action_are_refused_before_any_connection(argv, message, capsys,
                                                                                 monkeypatch):
    monkeypatch.delenv("OMNI_PG_DSN_AUTH_SERVICE", raising=False)  # nothing may reach a database
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_new_creates_the_next_pair_in_the_service_folder(tmp_path, monkeypatch, capsys):
    repo = Path(__file__).resolve().parents[2]
    shutil.copytree(repo / "include" / "sql", tmp_path / "sql")
    monkeypatch.setenv("OMNISPHERE_SQL_DIR", str(tmp_path / "sql"))
    assert main(["auth-service", "new", "add_users_locale"]) == 0
    folder = tmp_path / "sql" / "auth-service" / "migrations"
    assert (folder / "005_add_users_locale.up.sql").exists() and (folder / "005_add_users_locale.down.sql").exists()
    assert "005_add_users_locale.up.sql" in capsys.readouterr().out
