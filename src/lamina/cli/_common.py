"""What every CLI command shares: the state directory, the config, --json, and one way to fail."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lamina.config import LaminaConfig, load_config, resolve_state_dir
from lamina.errors import ConfigError, InvalidRequestError, LaminaError
from lamina.stack import checked_config, open_store
from lamina.store import Store

StateDirOption = Annotated[
    Path | None,
    typer.Option("--state-dir", help="State directory (default: $LAMINA_STATE_DIR, then ./.lamina)."),
]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="lamina.yaml (default: the embedded defaults).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

err_console = Console(stderr=True)
out_console = Console()


def print_table(table: Table) -> None:
    """``table`` with no word cut short: a column is at least as wide as its longest word (a name, an id,
    a path, a number), prose wraps at its spaces, and a table whose words do not fit the terminal is laid
    out wider (the terminal wraps its rows; a pipe gets them whole) instead of ending them with "…"."""
    for column in table.columns:
        words = (word for cell in (column.header, *column.cells) for word in _plain(cell).split())
        column.min_width = max(column.min_width or 0, max(map(cell_len, words), default=0))
    width = out_console.width
    # what Rich lays the columns out at for this width (it cannot shrink a column below its longest word)
    laid_out = table._calculate_column_widths(out_console, out_console.options.update_width(width))
    needed = sum(laid_out) + table._extra_width
    if needed <= width:
        out_console.print(table)
        return
    out_console.width = needed
    try:
        out_console.print(table)
    finally:
        out_console.width = width


def _plain(cell: object) -> str:
    return cell.plain if isinstance(cell, Text) else cell if isinstance(cell, str) else ""


def fail(exc: LaminaError | str, exit_code: int = 1) -> NoReturn:
    """Print one clear line to stderr and exit."""
    message = exc.message if isinstance(exc, LaminaError) else exc
    code = f" [{exc.code}]" if isinstance(exc, LaminaError) else ""
    err_console.print(f"[bold red]error{escape(code)}:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code)


def load(config: Path | None, state_dir: Path | None) -> tuple[LaminaConfig, Path]:
    """The effective config and state directory, or exit 2 with the config error."""
    try:
        cfg = load_config(config)
    except LaminaError as exc:
        fail(exc, exit_code=2)
    try:
        cfg = checked_config(cfg)  # engines and their options, against the installed engine plugins
    except ConfigError as exc:
        fail(f"{config}: {exc.message}" if config is not None else exc, exit_code=2)
    return cfg, resolve_state_dir(state_dir, cfg)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@contextmanager
def state_store(config: Path | None, state_dir: Path | None) -> Iterator[Store]:
    """The metadata store of the state directory, closed at the end; a bad input (InvalidRequestError)
    exits 2, any other Lamina error 1, each on one line."""
    with state(config, state_dir) as (_, _, store):
        yield store


@contextmanager
def state(config: Path | None, state_dir: Path | None) -> Iterator[tuple[LaminaConfig, Path, Store]]:
    """The effective config, the state directory and its open store, as ``state_store`` handles them."""
    cfg, root = load(config, state_dir)
    try:
        store = open_store(cfg, root)
    except LaminaError as exc:
        fail(exc)
    try:
        with failing():
            yield cfg, root, store
    finally:
        store.close()


@contextmanager
def failing() -> Iterator[None]:
    """A Lamina error raised within exits on one line: 2 for a bad input (InvalidRequestError), else 1."""
    try:
        yield
    except InvalidRequestError as exc:
        fail(exc, exit_code=2)
    except LaminaError as exc:
        fail(exc)
