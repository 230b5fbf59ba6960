"""``lamina top``: the running stack's key figures, live in the terminal.

It polls the gateway's ``/metrics`` (request rate, latency p50/p95, errors, queue, cache hit rate: the
same arithmetic as the dashboard, :mod:`lamina.application.dashboard`) and the dashboard's summary
``/ui/api/summary`` (replicas, cost, the bottleneck layer; an admin key when keys are on). Without the
summary, replicas come from ``/readyz`` and the rest shows as not available.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lamina.cli._common import fail, out_console
from lamina.cli._gateway_client import http_url

if TYPE_CHECKING:
    from lamina.application.dashboard import Figures

UrlOption = Annotated[str, typer.Option("--url", help="The gateway's base URL.", callback=http_url)]
KeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LAMINA_API_KEY", help="An admin key (default: $LAMINA_API_KEY)."),
]


@dataclass(frozen=True)
class Frame:
    figures: Figures
    summary: dict[str, Any] | None
    ready: dict[str, bool]
    note: str


class Poller:
    """Reads one frame of figures from a gateway per call."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float = 5.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        # imported here: the other commands of the CLI never load the web stack
        from lamina.application.dashboard import FigureHistory

        self._history = FigureHistory(self._metrics, window_s=0.0)

    def _metrics(self) -> str:
        response = self._client.get("/metrics")
        if response.status_code != 200:
            raise httpx.HTTPStatusError(
                f"/metrics answered {response.status_code}", request=response.request, response=response
            )
        return response.text

    def frame(self) -> Frame:
        figures = self._history.sample()
        summary, note = None, ""
        response = self._client.get("/ui/api/summary")
        if response.status_code == 200 and response.headers.get("content-type", "").startswith(
            "application/json"
        ):
            summary = response.json()
        elif response.status_code in (401, 403):
            note = "replicas, cost and the bottleneck need an admin key (--api-key or $LAMINA_API_KEY)"
            note += f": {_message(response)}" if self._client.headers.get("authorization") else ""
        else:
            note = f"the dashboard summary is not available here (HTTP {response.status_code})"
        ready: dict[str, bool] = {}
        if summary is None:
            probe = self._client.get("/readyz")
            deployments = probe.json().get("deployments", {}) if probe.status_code in (200, 503) else {}
            ready = {str(k): bool(v) for k, v in deployments.items()}
        return Frame(figures, summary, ready, note)

    def close(self) -> None:
        self._client.close()


def _message(response: httpx.Response) -> str:
    """The error message of a JSON error body, else the status line."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def render(frame: Frame, url: str) -> Group:
    """One frame as a Rich table of the key figures."""
    f, s = frame.figures, frame.summary or {}
    table = Table(title=f"Lamina at {url}", show_header=False, min_width=60)
    table.add_column("figure", style="bold")
    table.add_column("value")
    table.add_row("requests/s", _num(f.requests_per_s, ".2f"))
    table.add_row("latency p50 / p95", f"{_num(f.p50_ms, '.1f', ' ms')} / {_num(f.p95_ms, '.1f', ' ms')}")
    errors = f"{f.errors} (5xx)" + (f", {100 * f.error_ratio:.1f}% now" if f.error_ratio is not None else "")
    table.add_row("errors", f"{errors}; {f.refused} refused (4xx)")
    if s.get("deployments"):
        replicas = ", ".join(f"{d['name']} {d['ready']}/{d['desired']}" for d in s["deployments"])
    elif frame.ready:
        replicas = ", ".join(f"{k} {'ready' if v else 'not ready'}" for k, v in frame.ready.items())
    else:
        replicas = "n/a"
    table.add_row("replicas ready", replicas)
    queue = f"{f.in_flight} in flight" + (f", {f.waiting} waiting" if f.waiting is not None else "")
    table.add_row("queue", queue)
    cost = s.get("cost_usd_24h")
    table.add_row("cost (24 h)", "n/a" if cost is None else f"${cost:.6f}")
    table.add_row(
        "cache hit rate", _num(None if f.cache_hit_ratio is None else 100 * f.cache_hit_ratio, ".0f", "%")
    )
    busy, used = f.cpu_busy_ratio, f.memory_used_ratio
    table.add_row(
        "CPU / memory",
        f"{_num(None if busy is None else 100 * busy, '.0f', '% busy')} / "
        f"{_num(None if used is None else 100 * used, '.0f', '% used')}",
    )
    bottleneck = s.get("bottleneck")
    table.add_row(
        "bottleneck layer",
        "n/a" if not bottleneck else f"{bottleneck['layer']} ({bottleneck.get('why', '')})",
    )
    parts: list[Table | Text] = [table]
    if frame.note:
        parts.append(Text(frame.note, style="dim"))
    return Group(*parts)


def top(
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between two polls.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (for scripts).")] = False,
) -> None:
    """Show the running stack's key figures live (request rate, latency, errors, replicas, queue, cost,
    cache hit rate, bottleneck layer); Ctrl-C quits."""
    poller = Poller(url, api_key)
    try:
        if once:
            poller.frame()  # the first sample: rates need two
            time.sleep(min(interval, 1.0))
            out_console.print(render(poller.frame(), url))
            return
        with Live(render(poller.frame(), url), console=out_console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(poller.frame(), url), refresh=True)
    except httpx.HTTPError as exc:
        fail(f"cannot read the gateway at {url}: {exc}; is `lamina up` running there? (--url)")
    except KeyboardInterrupt:
        pass
    finally:
        poller.close()
