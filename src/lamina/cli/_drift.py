"""``lamina data drift NAME[@V] [--window 24h] [--json]``: the dataset version against live traffic.

It needs no running stack and no embedder: the reference vectors are in the vector store, the traffic's
in the drift window the gateway keeps in the metadata store. The report is stored (``drift_reports``),
which is what the gateway's drift gauges export.

The command is built by :func:`make_drift_command` around an :data:`OpenChecker` (the dataset catalog,
vector store and metadata store of a state directory), so that a test can run the real command on a
catalog of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Annotated

import typer

from lamina.cli._common import ConfigOption, JsonOption, StateDirOption, fail, load, out_console, print_json
from lamina.config import LaminaConfig
from lamina.data import DriftChecker
from lamina.errors import LaminaError
from lamina.stack import open_data_stack

#: (config, state directory) -> a drift checker over that state directory, open while the block runs.
OpenChecker = Callable[[LaminaConfig, Path], AbstractContextManager[DriftChecker]]

DriftCommand = Callable[[str, str, bool, Path | None, Path | None], None]


@contextmanager
def open_checker(cfg: LaminaConfig, state_dir: Path) -> Iterator[DriftChecker]:
    """The state directory's dataset catalog, vector store, drift window and stored reports."""
    data = open_data_stack(cfg, state_dir)
    try:
        yield data.drift_checker()
    finally:
        data.close()


def make_drift_command(opener: OpenChecker) -> DriftCommand:
    """The ``drift`` command over the given checker opener (the real one: :func:`open_checker`)."""

    def drift(
        name_at_version: Annotated[
            str,
            typer.Argument(
                metavar="NAME[@V]",
                help="The dataset version to compare with: NAME (latest), NAME@SEQ, NAME@TAG or NAME@ID.",
                show_default=False,
            ),
        ],
        window: Annotated[
            str, typer.Option("--window", "-w", help="How far back to read traffic: e.g. 30m, 24h, 7d.")
        ] = "24h",
        json_out: JsonOption = False,
        state_dir: StateDirOption = None,
        config: ConfigOption = None,
    ) -> None:
        """Compare a dataset version with the traffic of the last --window: is it still what users ask?"""
        cfg, root = load(config, state_dir)
        try:
            with opener(cfg, root) as checker:
                report = checker.check(name_at_version, window)
        except LaminaError as exc:
            fail(exc)
        if json_out:
            print_json(report.to_json())
            return
        out_console.print(report.explanation, highlight=False, soft_wrap=True, markup=False)
        out_console.print(f"(stored as drift report {report.id})", highlight=False, style="dim")

    return drift


drift = make_drift_command(open_checker)
