"""The command line's help: every command in the lists of commands has a one-line summary."""

from __future__ import annotations

import inspect
from typing import Any

import typer
from typer.testing import CliRunner

from lamina.cli import app
from lamina.cli._app import one_line_summaries


def _commands(command: Any, path: tuple[str, ...] = ("lamina",)) -> list[tuple[tuple[str, ...], Any]]:
    out = [(path, command)]
    for name, sub in getattr(command, "commands", {}).items():
        out += _commands(sub, (*path, name))
    return out


def test_every_command_lists_with_a_summary_of_one_line() -> None:
    """Typer's rich help keeps a docstring's line breaks in the list of commands; each command that
    needs one gets a summary with none (``deploy``'s docstring spans two lines)."""
    listed = _commands(typer.main.get_command(app))
    assert len(listed) > 30
    for path, command in listed:
        summary = command.short_help or inspect.cleandoc(command.help or "").split("\n\n")[0]
        assert "\n" not in summary, " ".join(path)
    out = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    assert "or write it with the config's deployments" in out


def test_a_summary_given_by_hand_is_kept() -> None:
    group = typer.Typer()

    @group.command(short_help="Short.")
    def long() -> None:
        """A docstring
        over two lines."""

    @group.command()
    def plain() -> None:
        """One line."""

    one_line_summaries(group)
    assert [c.short_help for c in group.registered_commands] == ["Short.", None]
