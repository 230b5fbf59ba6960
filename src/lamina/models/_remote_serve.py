"""How the replica worker serves a passthrough engine (one that answers OpenAI bodies itself, such as the
remote ``openai`` engine): on the event loop, many requests at once, in the worker's usual wire format.

The answer is the engine's, with ``model`` set to the served name and the ``lamina`` extension added (queue
time is the wait for one of the engine's slots, engine time the rest). A stream ends, as every replica's
does, with a usage chunk (``"choices": []``) carrying the extension, then ``[DONE]``; when the upstream
reported no usage the chunk's ``usage`` is null and the extension says ``"upstream_usage": false``, so that
nothing is counted rather than a guess. Errors before the first chunk are HTTP errors with their status;
later ones are an error event. A client that leaves cancels the engine's work, and so the upstream request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lamina.errors import EngineError, InvalidRequestError, LaminaError
from lamina.models._engine import Operation, PassthroughEngine
from lamina.models._request_json import read_json
from lamina.models._worker_stream import Timing
from lamina.models._worker_wire import DONE

log = logging.getLogger("lamina.models.worker")

T = TypeVar("T")
#: the answer to a request whose client has gone (nobody reads it; nginx's "client closed request")
_CLIENT_GONE = 499


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled and ClientGone raised."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watch.cancel()
        raise
    watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()


class PassthroughServer:
    """The endpoints' passthrough path for one replica."""

    def __init__(self, served_name: str, model_version: str | None) -> None:
        self.served_name = served_name
        self.model_version = model_version

    async def serve(
        self, request: Request, op: Operation, engine: PassthroughEngine, timing: Timing
    ) -> Response:
        body = read_json(await request.body())
        if not isinstance(body, dict):
            raise InvalidRequestError(f"the request body must be a JSON object, not {type(body).__name__}")
        try:
            if op != "embedding" and body.get("stream") is True:
                return await self._stream(request, op, engine, body, timing)
            answer = await unless_client_leaves(request, engine.answer(op, body, timing))
        except ClientGone:
            return Response(status_code=_CLIENT_GONE)
        timing.end()
        return JSONResponse({**answer, "model": self.served_name, "lamina": self._lamina(answer, timing)})

    async def _stream(
        self,
        request: Request,
        op: Operation,
        engine: PassthroughEngine,
        body: dict[str, Any],
        timing: Timing,
    ) -> Response:
        """Wait for the first chunk (an upstream error is still an HTTP error then), then stream."""
        chunks = aiter(engine.stream(op, body, timing))
        try:
            first = await unless_client_leaves(request, _first(chunks))
        except BaseException:
            await _close(chunks)
            raise
        return StreamingResponse(
            self._events(first, chunks, timing),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(
        self, first: dict[str, Any] | None, chunks: AsyncIterator[dict[str, Any]], timing: Timing
    ) -> AsyncIterator[bytes]:
        last: dict[str, Any] = {}
        usage: Any = None
        try:
            chunk = first
            while chunk is not None:
                last = chunk
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                if chunk.get("choices"):  # upstream's own usage chunk (``choices: []``) is replaced below
                    if not timing.first_token and _has_content(chunk):
                        timing.first_token = time.perf_counter()
                    yield _event({**chunk, "model": self.served_name})
                chunk = await anext(chunks, None)
            timing.end()
            ending: dict[str, Any] = {key: last[key] for key in ("id", "object", "created") if key in last}
            lamina = self._lamina({"usage": usage, "model": last.get("model")}, timing)
            yield _event(
                {**ending, "model": self.served_name, "choices": [], "usage": usage, "lamina": lamina}
            )
            yield DONE
        except LaminaError as exc:
            yield _event(exc.to_body()) + DONE
        except Exception as exc:
            log.exception("passthrough stream failed")
            failure = EngineError(f"the upstream stream failed ({type(exc).__name__}: {exc}); retry")
            yield _event(failure.to_body()) + DONE
        finally:
            await _close(chunks)

    def _lamina(self, answer: dict[str, Any], timing: Timing) -> dict[str, Any]:
        lamina = timing.as_json(self.model_version)
        lamina["upstream_usage"] = isinstance(answer.get("usage"), dict)
        if isinstance(answer.get("model"), str):
            lamina["upstream_model"] = answer["model"]
        return lamina


async def _first(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    return await anext(chunks, None)


async def _close(chunks: AsyncIterator[dict[str, Any]]) -> None:
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")):
            return True
        if isinstance(choice, dict) and choice.get("text"):
            return True
    return False


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
