"""``lamina costs [--by key|model|day] [--since 7d|ISO] [--json]``: spend from the cost ledger.

The gateway writes a ledger row for every settled model call into the metadata store; this reads them
from the state directory's store (no running stack needed) and sums them per key, model or UTC day.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer
from rich.table import Table

from lamina.cli._common import (
    ConfigOption,
    JsonOption,
    StateDirOption,
    fail,
    load,
    out_console,
    print_json,
    print_table,
)
from lamina.clock import utcnow
from lamina.data.drift import since_of
from lamina.errors import LaminaError
from lamina.stack import open_store

GROUPS: dict[str, Literal["key", "model", "day"]] = {"key": "key", "model": "model", "day": "day"}


def costs(
    by: Annotated[
        str, typer.Option("--by", help="Sum per key, model or day (UTC).", show_default=True)
    ] = "model",
    since: Annotated[
        str, typer.Option("--since", help="From when: a duration back (7d, 12h) or an ISO date or time.")
    ] = "30d",
    json_out: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """What model calls cost, from the gateway's ledger: requests, tokens, engine seconds and USD."""
    from lamina.application import CostLedger  # the gateway's package: only this command needs it

    group = GROUPS.get(by)
    if group is None:
        fail(f"--by {by!r}: use key, model or day")
    cfg, root = load(config, state_dir)
    try:
        start = since_of(since, utcnow(), "--since")
        store = open_store(cfg, root)
        try:
            lines = CostLedger(store).summary(group, start)
        finally:
            store.close()
    except LaminaError as exc:
        fail(exc)
    if json_out:
        print_json({"by": by, "since": start.isoformat(), "groups": [line.to_json() for line in lines]})
        return
    if not lines:
        out_console.print(f"no model calls since {start:%Y-%m-%d %H:%M} UTC")
        return
    table = Table(by, "requests", "prompt tokens", "completion tokens", "engine s", "USD")
    for line in lines:
        table.add_row(
            line.group,
            str(line.requests),
            str(line.prompt_tokens),
            str(line.completion_tokens),
            f"{line.engine_s:.2f}",
            f"{line.cost_usd:.6f}",
        )
    table.add_row(
        "total",
        str(sum(line.requests for line in lines)),
        str(sum(line.prompt_tokens for line in lines)),
        str(sum(line.completion_tokens for line in lines)),
        f"{sum(line.engine_s for line in lines):.2f}",
        f"{sum(line.cost_usd for line in lines):.6f}",
        style="bold",
    )
    out_console.print(f"since {start:%Y-%m-%d %H:%M} UTC")
    print_table(table)
