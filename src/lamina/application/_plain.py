"""A plain (not streamed) model call: dispatched, settled with the policies, checked by the output guards,
and dropped when its client leaves first (streams have :class:`~lamina.application._relay.StreamRelay`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from lamina.application._cache import CacheLookup
from lamina.application._policy import Admission, Usage
from lamina.application._ports import Dispatcher
from lamina.application._relay import Forward, client_gone, relayed_error, until_disconnected
from lamina.application._routing import Tries
from lamina.application._tracing import Exchange
from lamina.application.guards import OutputGuards
from lamina.errors import EngineError


async def unless_client_leaves(request: Request, exchange: Exchange, work: Awaitable[Response]) -> Response:
    """``work``, cancelled if the client disconnects first: the request to the replica is dropped with it,
    so the replica stops generating an answer nobody will read (a stream is watched by its relay).

    The watcher is a bare asyncio task that cancels ``work``'s scope (shielded settling inside it still
    completes); an anyio task group per request cost more CPU than the rest of the disconnect handling."""
    answer: Response | None = None
    with anyio.CancelScope() as scope:

        async def watch() -> None:
            await until_disconnected(request.receive)
            client_gone(exchange)
            scope.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            answer = await work
        finally:
            watcher.cancel()
    return answer if answer is not None else Response(status_code=499)


async def forward_plain(
    dispatcher: Dispatcher,
    fwd: Forward,
    exchange: Exchange,
    extra: Mapping[str, object],
    admission: Admission,
    guards: OutputGuards | None = None,
    tries: Tries | None = None,
    cache: CacheLookup | None = None,
) -> Response:
    """A plain (not streamed) request: the replica's answer without its ``lamina`` extension, settled with
    the policies (whatever happens, the admission is settled: with None when no answer came), then
    checked by the output guards (a block is a 400: the answer was computed, and is paid for). With
    ``tries`` (a model group), failed tries go on to the next member (application/_routing.py)."""
    try:
        if tries is None:
            answer = await _dispatch(dispatcher, fwd, exchange)
        else:
            answer = await tries.plain(
                fwd, exchange, admission.call.headers, lambda f: _dispatch(dispatcher, f, exchange)
            )
        if isinstance(answer, Response):
            return answer
        result, body, ext = answer
        call = admission.call
        call.deployment = result.deployment
        call.answer = {**body, **extra}
        with anyio.CancelScope(shield=True):
            await admission.settle(Usage.of(body.get("usage"), ext, result.replica_id))
        if call.usage_extra and isinstance(body.get("usage"), dict):
            body["usage"] = {**body["usage"], **call.usage_extra}
        if guards is not None:
            await guards.check_answer(call, body)
        if cache is not None and cache.stores:
            await cache.store_plain(body)
        # with where the time went, per layer (observability/_breakdown.py)
        return exchange.answer({**body, **extra} if extra else body, call.headers)
    finally:
        with anyio.CancelScope(shield=True):
            await admission.settle(None)


@dataclass(frozen=True)
class _Reply:
    deployment: str
    replica_id: str


async def _dispatch(
    dispatcher: Dispatcher, fwd: Forward, exchange: Exchange
) -> Response | tuple[_Reply, dict[str, Any], Mapping[str, Any]]:
    """One try: the replica's error answer as a Response, else its JSON body and ``lamina`` extension."""
    with exchange.dispatch_span(fwd.deployment) as (span, headers):
        result = await dispatcher.request(fwd.deployment, fwd.path, fwd.body, headers=headers)
        exchange.dispatched(span, result)
        upstream = result.response
        if upstream.status_code >= 400:
            return relayed_error(upstream, upstream.content, exchange, span)
        try:
            body = upstream.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise EngineError(
                f"the replica {result.replica_id} of {fwd.deployment} answered something that is not a "
                "JSON object; its log says why"
            )
        return _Reply(fwd.deployment, result.replica_id), body, exchange.record_reply(body, span)
