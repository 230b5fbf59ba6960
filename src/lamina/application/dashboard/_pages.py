"""Rendering: the Jinja2 environment of the package's templates, panels, and the headers of every page."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, Response

from lamina.application.dashboard._ports import Link, Table

log = logging.getLogger("lamina.dashboard")

#: the pages in the navigation bar, in order: (path, title)
NAV = (
    ("/", "Overview"),
    ("/ui/traces", "Traces"),
    ("/ui/deployments", "Deployments"),
    ("/ui/jobs", "Jobs"),
    ("/ui/datasets", "Datasets"),
    ("/ui/models", "Models"),
    ("/ui/costs", "Costs"),
    ("/ui/drift", "Drift"),
    ("/ui/playground", "Playground"),
)
#: scripts and styles from the package only; inline styles for the bars' widths; no framing
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
#: the files under static/ a page may load, with their media types
STATIC = {
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
    "vendor/htmx-2.0.11.min.js": "text/javascript",
    "vendor/uPlot-1.6.32.iife.min.js": "text/javascript",
    "vendor/uPlot-1.6.32.min.css": "text/css",
}


@dataclass(frozen=True)
class Panel:
    """A titled table, or the reason there is none."""

    title: str
    table: Table | None
    missing: str = ""
    #: what the source raised, if it failed (``missing`` says it)
    error: Exception | None = None


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("lamina.application.dashboard", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.tests["link"] = lambda value: isinstance(value, Link)
    env.filters["when"] = _when
    env.filters["num"] = _num
    return env


def _when(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _num(value: float | int | None, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}" if isinstance(value, float) else f"{value:,}{unit}"


class Pages:
    """The templates, rendered into responses with the dashboard's headers."""

    def __init__(self) -> None:
        self.env = _environment()

    def render(self, template: str, status: int = 200, **context: Any) -> Response:
        html = self.env.get_template(template).render(nav=NAV, **context)
        return HTMLResponse(html, status_code=status, headers=_HEADERS)

    @staticmethod
    def static(name: str) -> Response | None:
        media = STATIC.get(name)
        if media is None:
            return None
        data = resources.files("lamina.application.dashboard").joinpath("static", name).read_bytes()
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})


async def panel(title: str, source: Callable[..., Table] | None, *args: object, missing: str) -> Panel:
    """``source(*args)`` in a worker thread as a panel; ``missing`` when there is no source, the error
    when it fails (logged; the rest of the page renders)."""
    if source is None:
        return Panel(title, None, missing)
    try:
        return Panel(title, await run_in_threadpool(source, *args))
    except Exception as exc:  # one failing source must not take the page down
        log.warning("dashboard panel %r failed: %s", title, exc)
        return Panel(title, None, f"could not be read: {getattr(exc, 'message', exc)}", exc)


async def guarded(call: Callable[..., Any], *args: object) -> tuple[Any, str]:
    """``call(*args)`` in a worker thread, or None and its error's message."""
    try:
        return await run_in_threadpool(call, *args), ""
    except Exception as exc:  # a failing source shows as its message on its own panel
        log.warning("dashboard source %s failed: %s", getattr(call, "__name__", call), exc)
        return None, str(getattr(exc, "message", exc))


async def awaited(call: Callable[[], Awaitable[Any]]) -> tuple[Any, str]:
    """``await call()``, or None and its error's message (logged)."""
    try:
        return await call(), ""
    except Exception as exc:  # a failing source shows as its message on its own panel
        log.warning("dashboard source %s failed: %s", getattr(call, "__name__", call), exc)
        return None, str(getattr(exc, "message", exc))


def bars(values: Mapping[str, float]) -> list[tuple[str, float, float]]:
    """``(name, value, percent of the total)``, for the bars of a breakdown."""
    total = sum(values.values())
    return [(k, v, round(100 * v / total, 1) if total else 0.0) for k, v in values.items()]
