"""Which lab the lab subcommands act on when no --name is given: the CLI context's, never a guess."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmshift.errors import InvalidInputError
from vmshift.lab import context


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMSHIFT_CONFIG_DIR", str(tmp_path))
    return tmp_path


def test_context_lab_is_used_without_a_name(config_dir: Path) -> None:
    context.save_context("http://127.0.0.1:40123", "secret", "bsw1f2e")
    assert (config_dir / "context.json").exists()
    assert context.lab_name(None) == "bsw1f2e"


def test_a_given_name_wins_over_the_context(config_dir: Path) -> None:
    context.save_context("http://127.0.0.1:40123", "secret", "demo")
    assert context.lab_name("other") == "other"


def test_no_context_and_no_name_is_a_clear_error(config_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="No lab was named") as info:
        context.lab_name(None)
    assert "--name" in (info.value.hint or "")


def test_a_context_without_a_lab_is_no_lab(config_dir: Path) -> None:
    (config_dir / "context.json").write_text('{"server": "http://127.0.0.1:1", "token": "t"}\n')
    with pytest.raises(InvalidInputError):
        context.lab_name(None)


def test_an_unreadable_context_is_no_lab(config_dir: Path) -> None:
    (config_dir / "context.json").write_text("not json")
    with pytest.raises(InvalidInputError):
        context.lab_name(None)


def test_tearing_down_the_context_lab_forgets_it(config_dir: Path) -> None:
    context.save_context("http://127.0.0.1:40123", "secret", "demo")
    assert not context.clear_context("other")
    assert context.lab_name(None) == "demo"
    assert context.clear_context("demo")
    with pytest.raises(InvalidInputError):
        context.lab_name(None)


def test_cli_commands_resolve_through_the_context(config_dir: Path) -> None:
    """`vmshift lab env` (no root needed) without --name reads the context's lab."""
    from typer.testing import CliRunner

    from vmshift.cli.lab import lab_app

    runner = CliRunner()
    missing = runner.invoke(lab_app, ["env"])
    assert missing.exit_code == 1
    assert "No lab was named" in missing.output
    context.save_context("http://127.0.0.1:40123", "secret", "nosuchlab")
    named = runner.invoke(lab_app, ["env", "--json"])
    assert named.exit_code == 1
    assert "nosuchlab" in named.output
