"""``lamina traces`` (recent traces, one line each) and ``lamina trace ID`` (one trace as a waterfall).

Both read the state directory's metadata store directly, so they work whether or not the stack runs; with
``--url`` they ask a gateway instead (``/admin/v1/traces``, admin key), for a stack whose store this
machine cannot open (a container's volume, another host). A trace's spans reach the store a few seconds
after its answer (the span processor writes in batches).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from lamina.cli._common import (
    ConfigOption,
    JsonOption,
    StateDirOption,
    failing,
    load,
    out_console,
    print_json,
    print_table,
    state_store,
)
from lamina.cli._gateway_client import ApiKeyOption, UrlOption, admin_get
from lamina.clock import utcnow
from lamina.data.drift import since_of
from lamina.errors import NotFoundError
from lamina.observability import (
    TraceLine,
    TreeSpan,
    check_trace_id,
    read_trace,
    recent_traces,
    summarize,
    tree,
)

#: the timeline's width in characters
BAR_WIDTH = 40
LAYER_STYLES = {
    "application": "cyan",
    "data": "green",
    "models": "magenta",
    "orchestration": "yellow",
    "compute": "red",
}


def traces(
    since: Annotated[
        str, typer.Option("--since", help="From when: a duration back (15m, 2h) or an ISO date or time.")
    ] = "15m",
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=1000, help="At most this many, newest first.")
    ] = 20,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Recent traces: id, start, duration, route, model, HTTP status and the layer that took longest."""
    if url:
        with failing():
            body = admin_get(
                load(config, state_dir)[0], url, "/admin/v1/traces", api_key, since=since, limit=limit
            )
    else:
        with state_store(config, state_dir) as store:
            start = since_of(since, utcnow(), "--since")
            body = {
                "since": start.isoformat(),
                "traces": [t.to_json() for t in recent_traces(store, start, limit)],
            }
    if json_out:
        print_json(body)
        return
    if not body["traces"]:
        out_console.print(f"no traces since {body['since'][:19].replace('T', ' ')} UTC", highlight=False)
        return
    print_table(_table([TraceLine.from_json(t) for t in body["traces"]]))


def _table(lines: list[TraceLine]) -> Table:
    table = Table("start (UTC)", "ms", "route", "model", "status", "bottleneck")
    table.add_column("trace id", no_wrap=True, min_width=32)
    for line in lines:
        status = str(line.status or "-")
        table.add_row(
            f"{line.start:%H:%M:%S.%f}"[:-3],
            f"{line.duration_ms:.1f}",
            line.route,
            line.model,
            Text(status, style="red" if line.error or line.status >= 400 else "green"),
            Text(line.bottleneck, style=LAYER_STYLES.get(line.bottleneck, "")),
            line.trace_id,
        )
    return table


def bar(span: TreeSpan, total_ms: float, width: int = BAR_WIDTH) -> Text:
    """The span's place on the trace's time axis: blanks up to its start, a block as long as it lasts
    (at least one character)."""
    scale = width / total_ms if total_ms > 0 else 0.0
    start = min(width - 1, int(span.offset_ms * scale))
    length = max(1, min(width - start, round(span.duration_ms * scale)))
    text = Text(" " * start)
    text.append("█" * length, style=LAYER_STYLES.get(span.span["layer"] or "", "white"))
    return text


def trace(
    trace_id: Annotated[str, typer.Argument(help="The trace id (an answer's x-lamina-trace-id header).")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """One trace as a waterfall: each span under its parent, with its layer, duration and time bar."""
    if url:
        with failing():
            path = f"/admin/v1/traces/{check_trace_id(trace_id)}"
            body = admin_get(load(config, state_dir)[0], url, path, api_key)
    else:
        with state_store(config, state_dir) as store:
            rows = read_trace(store, check_trace_id(trace_id))
            if not rows:
                raise NotFoundError(
                    f"no stored trace {trace_id}: it was sampled out or deleted by retention, or its spans "
                    "are still being written (a few seconds); `lamina traces` lists the stored ones"
                )
        body = {**summarize(rows).to_json(), "spans": [s.to_json() for s in tree(rows)]}
    if json_out:
        print_json(body)
        return
    summary = TraceLine.from_json(body)
    spans = [TreeSpan.from_json(s, summary) for s in body["spans"]]
    status = summary.status or "-"
    out_console.print(
        f"trace {summary.trace_id}  {summary.route}  {summary.model}  HTTP {status}  "
        f"{summary.duration_ms:.1f} ms  started {summary.start:%Y-%m-%d %H:%M:%S} UTC",
        highlight=False,
    )
    names = max(len(s.span["name"]) + 2 * s.depth for s in spans)
    width = max(10, min(60, out_console.width - names - 40))
    table = Table("span", "layer", "ms")
    table.add_column(f"0 … {summary.duration_ms:.1f} ms", no_wrap=True, min_width=width)
    for span in spans:
        name = Text(
            "  " * span.depth + span.span["name"], style="red" if span.span["status"] == "error" else ""
        )
        layer = span.span["layer"] or ""
        table.add_row(
            name,
            Text(layer, style=LAYER_STYLES.get(layer, "")),
            f"{span.duration_ms:.1f}",
            bar(span, summary.duration_ms, width),
        )
    print_table(table)
    shares = ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(summary.layers_ms.items(), key=lambda kv: -kv[1]))
    out_console.print(
        f"self time per layer: {shares}; bottleneck: {summary.bottleneck or '-'}", highlight=False
    )
