"""The dashboard's routes: ``/`` and ``/ui/...``, server-rendered pages that poll with htmx.

Every page checks the admin key first (:mod:`._session`) and answers the login form (401) without one.
The figures that move (rates, latency, replicas) are a fragment that htmx fetches again every few
seconds, and ``/ui/api/summary`` gives them as JSON (the chart, and ``lamina top``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lamina.application._auth import Authenticator
from lamina.application._bounds import read_body
from lamina.application._requests import parse_body
from lamina.application.dashboard._figures import FigureHistory, Figures
from lamina.application.dashboard._pages import Pages, Panel, awaited, bars, guarded, panel
from lamina.application.dashboard._playground import ask
from lamina.application.dashboard._ports import DashboardSources, DeploymentView, Health, Table, Verdict
from lamina.application.dashboard._session import admitted, check_admin, clear_login, set_login, token_of
from lamina.errors import LaminaError, NotFoundError
from lamina.observability import check_trace_id

Page = Callable[[Request], Awaitable[Response]]
#: the window of the per-layer breakdown and of costs on the overview
_BREAKDOWN_S = 15 * 60
_LOGIN_BYTES = 4096
#: how long one verdict of the doctor is shown before it is asked again (it reads the window's traces)
_DOCTOR_TTL_S = 15.0


class _Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1, max_length=512, description="An admin key.")


def dashboard_router(sources: DashboardSources, auth: Authenticator, max_body_bytes: int) -> APIRouter:
    """The dashboard over ``sources``; ``auth`` says who is an admin (as on the admin API)."""
    ui = _Dashboard(sources, auth, max_body_bytes)
    router = APIRouter(include_in_schema=False)
    router.add_api_route("/ui/static/{name:path}", ui.static, methods=["GET"])
    router.add_api_route("/ui/login", ui.login, methods=["POST"])
    router.add_api_route("/ui/logout", ui.logout, methods=["POST"])
    for path, handler, method in ui.pages_by_path():
        router.add_api_route(path, ui.guarded(handler), methods=[method])
    return router


class _Dashboard:
    """The dashboard's pages over its sources: one method per page, each behind the admin login."""

    def __init__(self, sources: DashboardSources, auth: Authenticator, max_body_bytes: int) -> None:
        self.pages = Pages()
        self.history = FigureHistory(lambda: sources.metrics().decode())
        if sources.doctor is not None:  # the chart and `lamina top` poll every few seconds
            sources = replace(sources, doctor=_remembered(sources.doctor, _DOCTOR_TTL_S))
        self.sources = sources
        self.auth = auth
        self.max_body_bytes = max_body_bytes

    def pages_by_path(self) -> list[tuple[str, Page, str]]:
        """Every page behind the login: its path, its handler and its method."""
        sources, no_jobs = self.sources, "the job queue is not available on this gateway"
        return [
            ("/", self.overview, "GET"),
            ("/ui/partials/live", self.live_fragment, "GET"),
            ("/ui/api/summary", self.summary, "GET"),
            ("/ui/deployments", self.deployments, "GET"),
            ("/ui/traces", self.traces, "GET"),
            ("/ui/traces/{trace_id}", self.trace, "GET"),
            ("/ui/datasets/{ref}", self.lineage, "GET"),
            ("/ui/playground", self.playground, "GET"),
            ("/ui/chat", self.chat, "POST"),
            ("/ui/jobs", self.tables("Jobs", _static_panel("Jobs", sources.jobs, no_jobs)), "GET"),
            (
                "/ui/datasets",
                self.tables(
                    "Datasets",
                    _static_panel("Datasets and versions", sources.datasets, "no data catalog here"),
                ),
                "GET",
            ),
            (
                "/ui/models",
                self.tables("Models", _static_panel("Registered models", sources.models, "no registry here")),
                "GET",
            ),
            ("/ui/costs", self.tables("Costs", self.costs_by("key"), self.costs_by("model")), "GET"),
            (
                "/ui/drift",
                self.tables(
                    "Drift", _static_panel("Latest drift reports", sources.drift, "no drift reports")
                ),
                "GET",
            ),
        ]

    def guarded(self, handler: Page) -> Page:
        """``handler`` for admins; the login form (401) for anyone else, or under ``/ui/api/`` (read by
        programs: ``lamina top``) the admin API's JSON error, 401 without a valid key, 403 with a key
        that is not an admin's."""

        async def guarded_page(request: Request) -> Response:
            if request.url.path.startswith("/ui/api/"):
                await check_admin(self.auth, request, token_of(request))
                return await handler(request)
            principal, why = await admitted(self.auth, request)
            if principal is None:
                return self.pages.render("login.html", status=401, title="Sign in", error=why)
            return await handler(request)

        guarded_page.__name__ = handler.__name__
        return guarded_page

    async def live(self) -> dict[str, Any]:
        figures: Figures = await run_in_threadpool(self.history.sample)
        deployments, dep_error = await _deployments(self.sources)
        return {"figures": figures, "deployments": deployments, "deployments_error": dep_error}

    async def static(self, name: str) -> Response:
        found = self.pages.static(name)
        if found is None:
            raise NotFoundError(f"the dashboard has no file {name!r}")
        return found

    async def login(self, request: Request) -> Response:
        raw = await read_body(request, min(self.max_body_bytes, _LOGIN_BYTES))
        _, body = parse_body(raw, _Login)
        await check_admin(self.auth, request, body.key)
        response = Response(status_code=204)
        set_login(response, request, body.key)
        return response

    async def logout(self) -> Response:
        response = Response(status_code=204)
        clear_login(response)
        return response

    async def overview(self, request: Request) -> Response:
        sources, context = self.sources, await self.live()
        verdict, doctor_error = (None, "") if sources.doctor is None else await awaited(sources.doctor)
        breakdown: dict[str, float] = {}
        trace_error = "traces are not stored on this gateway (observability.store_spans is off)"
        if sources.traces is not None:
            found, trace_error = await guarded(sources.traces.layer_ms, _BREAKDOWN_S)
            breakdown = found or {}
        datasets, _ = (None, "") if sources.datasets is None else await guarded(sources.datasets)
        return self.pages.render(
            "overview.html",
            title="Overview",
            layers=_layers(context["figures"], context["deployments"], datasets, sources),
            breakdown=bars(breakdown),
            breakdown_error=trace_error if not breakdown else "",
            verdict=verdict,
            doctor_error=doctor_error or ("" if sources.doctor else "the doctor is not available here"),
            **context,
        )

    async def live_fragment(self, request: Request) -> Response:
        return self.pages.render("live.html", **await self.live())

    async def summary(self, request: Request) -> Response:
        return JSONResponse(await summary_json(self.sources, await self.live()))

    async def deployments(self, request: Request) -> Response:
        return self.pages.render("deployments.html", title="Deployments", **await self.live())

    def tables(self, title: str, *panels: Callable[[Request], Awaitable[Panel]]) -> Page:
        """A page of tables, one per panel."""

        async def render(request: Request) -> Response:
            return self.pages.render("tables.html", title=title, panels=[await p(request) for p in panels])

        render.__name__ = title.lower()
        return render

    def costs_by(self, by: str) -> Callable[[Request], Awaitable[Panel]]:
        async def made(_: Request) -> Panel:
            source = None if self.sources.costs is None else _cost_table(self.sources, by)
            return await panel(f"Costs by {by} (24 h)", source, missing="the cost ledger is not available")

        return made

    async def lineage(self, request: Request) -> Response:
        ref = request.path_params["ref"]
        shown = await panel(
            f"Lineage of {ref}", self.sources.lineage, ref, missing="lineage is not available"
        )
        if isinstance(shown.error, NotFoundError):  # a dataset or version that is not there: a 404
            return self.pages.render(
                "missing.html",
                status=404,
                title="No such dataset version",
                message=shown.error.message,
                back="/ui/datasets",
                back_label="The datasets",
            )
        return self.pages.render("tables.html", title=f"Dataset {ref}", panels=[shown])

    async def traces(self, request: Request) -> Response:
        if self.sources.traces is None:
            return self.pages.render(
                "traces.html", title="Traces", traces=[], error="traces are not stored here"
            )
        found, error = await guarded(self.sources.traces.recent, 50)
        return self.pages.render("traces.html", title="Traces", traces=found or [], error=error)

    async def trace(self, request: Request) -> Response:
        trace_id, store = request.path_params["trace_id"], self.sources.traces
        try:
            trace_id = check_trace_id(trace_id)
        except LaminaError as exc:
            return self.pages.render(
                "missing.html",
                status=404,
                title="Not a trace id",
                message=exc.message,
                back="/ui/traces",
                back_label="The stored traces",
            )
        spans = [] if store is None else await run_in_threadpool(store.spans, trace_id)
        if not spans:  # not exported yet (batches), or gone: the page looks again
            return self.pages.render("pending.html", title=f"Trace {trace_id}", trace_id=trace_id)
        start, end = min(s.start_ns for s in spans), max(s.end_ns for s in spans)
        total = max(end - start, 1)
        rows = [
            (s, 100 * (s.start_ns - start) / total, max(100 * (s.end_ns - s.start_ns) / total, 0.3))
            for s in spans
        ]
        return self.pages.render(
            "trace.html",
            title=f"Trace {trace_id}",
            trace_id=trace_id,
            rows=rows,
            depth=_depths(spans),
            total_ms=total / 1e6,
        )

    async def playground(self, request: Request) -> Response:
        sources = self.sources
        names, _ = ([], "") if sources.chat_models is None else await guarded(sources.chat_models)
        return self.pages.render(
            "playground.html", title="Playground", models=list(names or []), chosen=sources.playground_model
        )

    async def chat(self, request: Request) -> Response:
        answer = await ask(request, self.max_body_bytes)
        return self.pages.render("answer.html", answer=answer)


def _static_panel(title: str, source: Callable[[], Table] | None, missing: str) -> Callable[..., Any]:
    async def made(_: Request) -> Panel:
        return await panel(title, source, missing=missing)

    return made


def _remembered(ask: Callable[[], Awaitable[Verdict]], ttl_s: float) -> Callable[[], Awaitable[Verdict]]:
    """``ask``, answered from its last result for ``ttl_s`` seconds; one call at a time."""
    last: list[tuple[float, Verdict]] = []
    lock = asyncio.Lock()

    async def remembered() -> Verdict:
        async with lock:
            if not last or time.monotonic() - last[0][0] > ttl_s:
                last[:] = [(time.monotonic(), await ask())]
            return last[0][1]

    return remembered


async def _deployments(sources: DashboardSources) -> tuple[list[DeploymentView], str]:
    if sources.deployments is None:
        return [], "deployments are not available here"
    found, error = await guarded(sources.deployments)
    return list(found or []), error


def _cost_table(sources: DashboardSources, by: str) -> Callable[[], Table]:
    def read() -> Table:
        assert sources.costs is not None
        lines = sources.costs.summary(
            "key" if by == "key" else "model", datetime.now(UTC) - timedelta(days=1)
        )
        return Table(
            (by, "requests", "prompt tokens", "completion tokens", "engine s", "USD"),
            [
                (
                    ln.group,
                    ln.requests,
                    ln.prompt_tokens,
                    ln.completion_tokens,
                    round(ln.engine_s, 2),
                    f"{ln.cost_usd:.6f}",
                )
                for ln in lines
            ],
            note="from the cost ledger, the last 24 hours",
        )

    return read


def _layers(
    figures: Figures, deployments: list[DeploymentView], datasets: Table | None, sources: DashboardSources
) -> list[tuple[str, Health, str]]:
    """The health of each layer, in the stack's order (top first), with one line of evidence."""
    app: Health = "degraded" if (figures.error_ratio or 0) > 0.05 else "ok"
    app_line = f"{figures.requests} requests, {figures.errors} errors, {figures.refused} refused"
    ready = sum(1 for d in deployments if d.ready > 0)
    models: Health = "unknown" if not deployments else ("ok" if ready == len(deployments) else "degraded")
    if deployments and ready == 0:
        models = "down"
    short = [d for d in deployments if d.ready < d.desired]
    orch: Health = "unknown" if not deployments else ("degraded" if short else "ok")
    orch_line = ", ".join(f"{d.name} {d.ready}/{d.desired}" for d in deployments) or "no deployments"
    data: Health = "unknown" if datasets is None else "ok"
    shown = 0 if datasets is None else len(datasets.rows)
    data_line = (
        "no data catalog" if datasets is None else f"{shown} dataset version{'' if shown == 1 else 's'}"
    )
    mem, cpu = figures.memory_used_ratio, figures.cpu_busy_ratio
    compute: Health = "unknown" if mem is None else ("degraded" if mem > 0.95 else "ok")
    compute_line = "no device telemetry yet" if mem is None else f"memory {mem:.0%} used"
    if cpu is not None:
        compute_line = f"CPU {cpu:.0%} busy, {compute_line}"
    return [
        ("application", app, app_line),
        ("models", models, f"{ready} of {len(deployments)} deployments serving"),
        ("data", data, data_line),
        ("orchestration", orch, orch_line),
        ("compute", compute, compute_line),
    ]


def _depths(spans: list[Any]) -> dict[str, int]:
    parents = {s.span_id: s.parent_span_id for s in spans}
    depth: dict[str, int] = {}
    for s in spans:
        d, p = 0, s.parent_span_id
        while p is not None and p in parents and d < 32:
            d, p = d + 1, parents[p]
        depth[s.span_id] = d
    return depth


async def summary_json(sources: DashboardSources, context: dict[str, Any]) -> dict[str, Any]:
    """The key figures as ``lamina top`` reads them."""
    figures: Figures = context["figures"]
    deployments: list[DeploymentView] = context["deployments"]
    cost = None
    if sources.costs is not None:
        since = datetime.now(UTC) - timedelta(days=1)
        lines, _ = await guarded(sources.costs.summary, "model", since)
        cost = None if lines is None else round(sum(line.cost_usd for line in lines), 9)
    bottleneck: dict[str, Any] | None = None
    if sources.doctor is not None:
        verdict, _ = await awaited(sources.doctor)
        if verdict is not None and verdict.layer:
            bottleneck = {"layer": verdict.layer, "why": verdict.summary, "source": "doctor"}
    layer_ms: dict[str, float] = {}
    if sources.traces is not None:
        layer_ms = (await guarded(sources.traces.layer_ms, _BREAKDOWN_S))[0] or {}
    if bottleneck is None and layer_ms:
        layer = next(iter(layer_ms))
        bottleneck = {
            "layer": layer,
            "why": f"most time in the last 15 min ({layer_ms[layer]:.0f} ms)",
            "source": "spans",
        }
    return {
        "figures": figures.to_json(),
        "deployments": [{"name": d.name, "desired": d.desired, "ready": d.ready} for d in deployments],
        "cost_usd_24h": cost,
        "bottleneck": bottleneck,
        "layer_ms": layer_ms,
    }
