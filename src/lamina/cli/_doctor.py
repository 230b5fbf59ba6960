"""``lamina doctor [--window 15m] [--json]``: the layer to look at now, why, what to do, and what is broken.

It asks the running gateway (``GET /admin/v1/doctor``): only that process knows its replicas, the calls in
flight and the indexes it has loaded. When no gateway answers (or with ``--offline``) it diagnoses from the
state directory's store alone: the window's traces, the drift reports, the budget and this machine's CPU
now; the output says which it did.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape

from lamina.cli._common import ConfigOption, JsonOption, StateDirOption, fail, load, out_console, print_json
from lamina.cli._gateway_client import ApiKeyOption, UrlOption, auth_headers, checked_json, gateway_url
from lamina.errors import LaminaError

LAYER_STYLES = {
    "application": "cyan",
    "data": "green",
    "models": "magenta",
    "orchestration": "yellow",
    "compute": "red",
}


def _offline(config: Any, state_dir: Any, window: str) -> dict[str, Any]:
    from lamina.stack import open_store
    from lamina.stack.gateway import gather_offline

    cfg, root = load(config, state_dir)
    store = open_store(cfg, root)
    try:
        return gather_offline(cfg, store, window).to_json()
    finally:
        store.close()


def doctor(
    window: Annotated[
        str, typer.Option("--window", help="How far back to look: 15m, 1h, 1d, or since an ISO time.")
    ] = "15m",
    offline: Annotated[
        bool, typer.Option("--offline", help="Do not ask a running gateway: the store alone.")
    ] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Name the bottleneck layer with its evidence and the next action, and list what is broken."""
    from lamina.clock import utcnow
    from lamina.data.drift import since_of

    cfg, _ = load(config, state_dir)
    base = gateway_url(cfg, url)
    source = f"the gateway at {base}"
    try:
        since_of(window, utcnow(), "--window")
        verdict: dict[str, Any] | None = None
        if not offline:
            try:
                response = httpx.get(
                    f"{base}/admin/v1/doctor",
                    params={"window": window},
                    headers=auth_headers(cfg, api_key),
                    timeout=30,
                )
                verdict = checked_json(response)
            except httpx.TransportError:
                verdict = None
        if verdict is None:
            source = "the store alone (no gateway answered: no live replica or device figures)"
            verdict = _offline(config, state_dir, window)
    except LaminaError as exc:
        fail(exc)
    if json_out:
        print_json({**verdict, "source": source})
        return
    _print(verdict, source)


def _print(verdict: dict[str, Any], source: str) -> None:
    from lamina.observability import period_of

    layer = verdict.get("bottleneck")
    out_console.print(f"[dim]from {escape(source)}, {escape(period_of(verdict['window']))}[/]")
    if layer:
        style = LAYER_STYLES.get(layer, "bold")
        share = f"{verdict['share']:.0%}"
        out_console.print(f"bottleneck: [bold {style}]{layer}[/] ({share} of the time)", highlight=False)
    else:
        out_console.print("bottleneck: [dim]none named[/]")
    for line in verdict.get("evidence", []):
        out_console.print(f"  • {escape(line)}", highlight=False)
    actions = verdict.get("actions", [])
    if actions:
        out_console.print("next:")
        for line in actions:
            out_console.print(f"  → {escape(line)}", highlight=False)
    problems = verdict.get("problems", [])
    out_console.print("broken:" if problems else "broken: [green]nothing found[/]")
    for p in problems:
        out_console.print(
            f"  [red]✗[/] [{escape(p['layer'])}] {escape(p['what'])}: {escape(p['action'])}", highlight=False
        )
