"""``/admin/v1`` for observing the stack: stored traces and the doctor's verdict (admin keys only).

- ``GET /admin/v1/traces?since=15m&limit=50``: the newest traces (``lamina traces --json`` prints the same);
- ``GET /admin/v1/traces/{trace_id}``: one trace, its spans as a tree (``lamina trace ID --json``);
- ``GET /admin/v1/doctor?window=15m``: the bottleneck layer with its evidence and next action, and what is
  broken (``lamina doctor --json``).

Store reads run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lamina.clock import Clock, utcnow
from lamina.data.drift import since_of
from lamina.errors import InvalidRequestError, NotFoundError, UnavailableError
from lamina.observability import Verdict, check_trace_id, recent_traces, trace_json
from lamina.store import Store

#: the doctor over a window (``15m``, ``1h``...), gathered by the composition root
Doctor = Callable[[str], Awaitable[Verdict]]
MAX_LIMIT = 1_000


def observe_router(
    store: Store,
    doctor: Doctor | None,
    authenticate: Callable[[Request], Awaitable[None]],
    clock: Clock = utcnow,
) -> APIRouter:
    """The routes of the module doc, behind the gateway's admin key check."""
    router = APIRouter(prefix="/admin/v1", dependencies=[Depends(authenticate)])

    @router.get("/traces")
    async def list_traces(since: str = "15m", limit: int = 50) -> Response:
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequestError(f"limit must be 1 to {MAX_LIMIT}, got {limit}", param="limit")
        start = since_of(since, clock())
        lines = await asyncio.to_thread(recent_traces, store, start, limit)
        body: dict[str, Any] = {"since": start.isoformat(), "traces": [line.to_json() for line in lines]}
        return JSONResponse(body)

    @router.get("/traces/{trace_id}")
    async def get_trace(trace_id: str) -> Response:
        found = await asyncio.to_thread(trace_json, store, check_trace_id(trace_id))
        if found is None:
            raise NotFoundError(
                f"no stored trace {trace_id}: it was sampled out, deleted by retention, or its spans are "
                "still being written (a few seconds); GET /admin/v1/traces lists the stored ones"
            )
        return JSONResponse(found)

    @router.get("/doctor")
    async def get_doctor(window: str = "15m") -> Response:
        if doctor is None:
            raise UnavailableError("the doctor is not wired into this gateway")
        since_of(window, clock(), "window")  # a bad window is a 400 before anything is gathered
        return JSONResponse((await doctor(window)).to_json())

    return router
