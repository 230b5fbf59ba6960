"""The command line's output: one-line summaries in the lists of commands, tables that never cut a word."""

from __future__ import annotations

import inspect
import io
from typing import Any

import pytest
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.testing import CliRunner

from lamina.cli import _common, app
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


def test_a_table_never_cuts_a_word_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids and names keep every character on a narrow terminal (the table is laid out wider and the
    terminal wraps it); prose wraps at its spaces; a table that fits is left as Rich lays it out."""
    out = io.StringIO()
    monkeypatch.setattr(_common, "out_console", Console(file=out, width=60))
    trace_id = "cf17cc371aed49a88ffa271bc7126044"
    table = Table("trace id", "model", "about")
    table.add_row(trace_id, Text("smollm2-135m-instruct"), "a sentence of prose that wraps at its spaces")
    _common.print_table(table)
    text = out.getvalue()
    assert trace_id in text and "smollm2-135m-instruct" in text and "…" not in text
    assert max(map(len, text.splitlines())) > 60  # wider than the terminal rather than cut
    assert "a sentence of prose that wraps at its spaces" not in text  # wrapped
    assert _common.out_console.width == 60

    small_out = io.StringIO()
    monkeypatch.setattr(_common, "out_console", Console(file=small_out, width=60))
    small = Table("a", "b")
    small.add_row("x", "y")
    _common.print_table(small)
    assert 0 < max(map(len, small_out.getvalue().splitlines())) <= 60


def test_a_wide_table_keeps_its_last_column_and_headers_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lamina deployments` piped (80 columns): a header longer than its cells ("READY/DESIRED") counted
    as a word too, or the table was laid out too narrow and its last column cropped ("ROLLO")."""
    out = io.StringIO()
    monkeypatch.setattr(_common, "out_console", Console(file=out, width=80))
    headers = ("NAME", "SOURCE", "MODEL", "REPLICAS", "READY/DESIRED", "STATE", "AUTOSCALER", "ROLLOUT")
    table = Table(*headers)
    row = ("smollm2-135m-instruct", "config", "smollm2-135m-instruct@1", "1..1", "1/1", "ready", "", "")
    table.add_row(*row)
    _common.print_table(table)
    lines = out.getvalue().splitlines()
    assert all(header in lines[1] for header in headers), lines[1]
    assert len({len(line) for line in lines}) == 1  # every line whole, none cut short


@pytest.mark.parametrize(
    "argv",
    [
        ["doctor", "--url", "localhost:8000"],
        ["top", "--url", "127.0.0.1:8000"],
        ["deployments", "--url", "gateway:8000"],
        ["data", "ingest", "docs", "--dataset", "d", "--gateway", "--state-dir"],
    ],
)
def test_a_url_option_without_a_url_is_refused_at_once(argv: list[str]) -> None:
    """A URL without its scheme, or an option left without its value (which takes the next option's
    name), is a usage error naming the option, before anything is read or sent."""
    result = CliRunner().invoke(app, argv, terminal_width=200)
    assert result.exit_code == 2
    assert "is not a URL" in result.output and ("'--url'" in result.output or "'--gateway'" in result.output)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("::1", "http://[::1]:8000"),
        ("fd00::5", "http://[fd00::5]:8000"),
        ("[fd00::5]", "http://[fd00::5]:8000"),
        ("gateway.internal", "http://gateway.internal:8000"),
    ],
)
def test_the_gateway_url_of_a_config_is_reachable(host: str, url: str) -> None:
    """Every command that talks to the gateway finds it from the config's bind address: a wildcard bind
    on loopback, an IPv6 address in brackets (without them its colons would read as a port)."""
    from lamina.cli._gateway_client import gateway_url
    from lamina.config import LaminaConfig

    cfg = LaminaConfig.model_validate({"server": {"host": host, "port": 8000}})
    assert gateway_url(cfg, None) == url
    assert gateway_url(cfg, "http://elsewhere:9000/") == "http://elsewhere:9000"
