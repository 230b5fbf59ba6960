"""The replica worker's HTTP app: OpenAI-style endpoints in front of one engine.

Requests are validated here (a bad field is a 400 naming it), checked against what the engine can do and
against its context, then run on the engine thread; embedding requests that arrive together share one
engine call (``lamina.models._microbatch``). Non-streaming bodies and the last streamed event carry a
``lamina`` field with the request's queue and engine times, which the gateway turns into spans; an
embedding body's also says how many requests and texts shared its engine call (``batch_requests``,
``batch_texts``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lamina.errors import (
    EngineError,
    InvalidRequestError,
    LaminaError,
    UnavailableError,
    UnsupportedCapabilityError,
)
from lamina.models._engine import (
    BatchingEngine,
    Capability,
    Delta,
    Engine,
    EngineInfo,
    PassthroughEngine,
    SamplingParams,
    Sink,
)
from lamina.models._microbatch import BatchPolicy, MicroBatcher
from lamina.models._openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from lamina.models._remote_serve import PassthroughServer
from lamina.models._request_json import read_json
from lamina.models._request_plan import plan_chat, plan_completion
from lamina.models._tools import ToolPlan
from lamina.models._worker_jobs import admission, collect, generation
from lamina.models._worker_stream import EngineRunner, Timing, TokenStream
from lamina.models._worker_wire import DONE, ChunkEncoder, completion_body

log = logging.getLogger("lamina.models.worker")

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class Replica:
    """What the app serves: one engine (None while it loads) behind one engine thread."""

    served_name: str
    model_version: str | None
    runner: EngineRunner
    engine: Engine | None = None
    info: EngineInfo | None = None

    def ready(self) -> tuple[Engine, EngineInfo]:
        if self.engine is None or self.info is None:
            raise UnavailableError(
                f"model {self.served_name!r} is still loading on this replica; retry shortly"
            )
        return self.engine, self.info


def info_json(info: EngineInfo) -> dict[str, Any]:
    return {
        "engine": info.engine,
        "capabilities": sorted(c.value for c in info.capabilities),
        "context_length": info.context_length,
        "embedding_dim": info.embedding_dim,
        "device": info.device,
        "details": dict(info.details),
    }


def field_path(loc: tuple[int | str, ...], body: Any, missing: bool) -> str:
    """The dotted path of a validation error in the client's body, without pydantic's union-member tags."""
    parts, node = [], body
    for i, seg in enumerate(loc):
        in_dict = isinstance(node, dict) and isinstance(seg, str) and seg in node
        in_list = isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node)
        if in_dict or in_list:
            node = node[seg]
        elif not (missing and i == len(loc) - 1):
            break
        parts.append(str(seg))
    return ".".join(parts)


async def parse_body(request: Request, model: type[M]) -> M:
    """The request body as ``model``, or an InvalidRequestError whose ``param`` names the bad field."""
    body = read_json(await request.body())
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = field_path(tuple(err["loc"]), body, err["type"] == "missing") or None
        raise InvalidRequestError(
            f"invalid field `{path or '(body)'}`: {err['msg']}; fix it and send the request again", param=path
        ) from exc


def require(info: EngineInfo, served_name: str, capability: Capability, stream: bool = False) -> None:
    for needed in (capability, Capability.STREAMING) if stream else (capability,):
        if needed not in info.capabilities:
            can = ", ".join(sorted(c.value for c in info.capabilities))
            raise UnsupportedCapabilityError(
                f"model {served_name!r} cannot do {needed.value}; it can do: {can}. Send this request to a "
                f"model that can{' or leave stream off' if needed is Capability.STREAMING else ''}",
                param="stream" if needed is Capability.STREAMING else "model",
            )


def encode_vector(vector: list[float], encoding: Literal["float", "base64"]) -> list[float] | str:
    """OpenAI's ``base64`` encoding: the little-endian float32 bytes of the vector."""
    if encoding == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def error_response(exc: LaminaError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=exc.headers or None)


def guarded(handler: Handler) -> Handler:
    """Errors become OpenAI-style bodies; foreign exceptions from the engine are mapped by type here."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except LaminaError as exc:
            return error_response(exc)
        except Exception as exc:
            log.exception("request to %s failed", request.url.path)
            return error_response(
                EngineError(f"the engine failed on this request ({type(exc).__name__}: {exc}); retry it")
            )

    return endpoint


@dataclass
class _Job:
    """One generation request as the endpoints hand it on."""

    kind: Literal["chat", "completion"]
    #: what the prompt is called in errors: ``messages`` or ``prompt``
    what: str
    params: SamplingParams
    timing: Timing
    echo: str = ""
    tools: ToolPlan | None = None
    logprobs: bool = False


async def _cancel_on_disconnect(request: Request, tokens: TokenStream[int | Delta]) -> None:
    """Cancel the request's generation when its client disconnects (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    tokens.cancel()


class WorkerApp:
    """The endpoints, bound to one replica."""

    def __init__(
        self, replica: Replica, batching: BatchPolicy | None = None, *, watchdog_s: float = 60.0
    ) -> None:
        self.replica = replica
        #: an engine job or step running longer than this fails the health check (the engine is stuck)
        self.watchdog_s = watchdog_s
        #: embedding requests that arrive together share one engine call
        self.batcher = MicroBatcher(replica.runner, lambda: replica.ready()[0], batching)
        self.passthrough = PassthroughServer(replica.served_name, replica.model_version)

    def starlette(self, on_startup: Callable[[], None]) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/info", self.info, methods=["GET"]),
            Route("/v1/chat/completions", guarded(self.chat), methods=["POST"]),
            Route("/v1/completions", guarded(self.completions), methods=["POST"]),
            Route("/v1/embeddings", guarded(self.embeddings), methods=["POST"]),
        ]

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            on_startup()
            yield
            if (engine := self._passthrough()) is not None:
                await engine.aclose()

        return Starlette(routes=routes, lifespan=lifespan)

    async def health(self, request: Request) -> Response:
        r = self.replica
        if r.info is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        stuck = r.runner.stalled(self.watchdog_s)
        if stuck is not None:
            reason = f"the engine has made no progress for {stuck:.0f} s (watchdog {self.watchdog_s:g} s)"
            return JSONResponse({"status": "stuck", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready", "info": info_json(r.info)})

    async def info(self, request: Request) -> Response:
        r = self.replica
        return JSONResponse(
            {
                "served_name": r.served_name,
                "model_version": r.model_version,
                "status": "loading" if r.info is None else "ready",
                "info": None if r.info is None else info_json(r.info),
            }
        )

    def _passthrough(self) -> PassthroughEngine | None:
        """The engine when it answers requests itself on the event loop (capability passthrough)."""
        ok = self.replica.info is not None and Capability.PASSTHROUGH in self.replica.info.capabilities
        return cast(PassthroughEngine, self.replica.engine) if ok else None

    async def chat(self, request: Request) -> Response:
        timing = Timing(received=time.perf_counter())
        if (passthrough := self._passthrough()) is not None:
            return await self.passthrough.serve(request, "chat", passthrough, timing)
        req = await parse_body(request, ChatCompletionRequest)
        engine, info = self.replica.ready()
        require(info, self.replica.served_name, Capability.CHAT, stream=req.stream)
        plan = plan_chat(req, info.capabilities, self.replica.served_name)
        messages = plan.messages
        job = _Job(
            "chat",
            "messages",
            plan.params,
            timing,
            tools=plan.tools,
            logprobs=plan.params.logprobs is not None,
        )
        tokens = self._start(
            job,
            info,
            lambda: engine.count_chat_tokens(messages),
            lambda p: engine.chat(messages, p),
            lambda p, sink: cast(BatchingEngine, engine).submit_chat(messages, p, sink),
        )
        return await self._respond(request, job, tokens, req.stream)

    async def completions(self, request: Request) -> Response:
        timing = Timing(received=time.perf_counter())
        if (passthrough := self._passthrough()) is not None:
            return await self.passthrough.serve(request, "completion", passthrough, timing)
        req = await parse_body(request, CompletionRequest)
        engine, info = self.replica.ready()
        require(info, self.replica.served_name, Capability.COMPLETION, stream=req.stream)
        params = plan_completion(req, info.capabilities, self.replica.served_name)
        prompt = req.prompt_text
        job = _Job(
            "completion",
            "prompt",
            params,
            timing,
            echo=prompt if req.echo else "",
            logprobs=params.logprobs is not None,
        )
        tokens = self._start(
            job,
            info,
            lambda: engine.count_tokens(prompt),
            lambda p: engine.complete(prompt, p),
            lambda p, sink: cast(BatchingEngine, engine).submit_completion(prompt, p, sink),
        )
        return await self._respond(request, job, tokens, req.stream)

    def _start(
        self,
        job: _Job,
        info: EngineInfo,
        count: Callable[[], int],
        run: Callable[[SamplingParams], Iterator[Delta]],
        submit: Callable[[SamplingParams, Sink], None],
    ) -> TokenStream[int | Delta]:
        """Hand the request to the engine thread: submitted to a batching engine, else run as an iterator."""
        runner, context = self.replica.runner, info.context_length
        if Capability.BATCHING in info.capabilities:
            return runner.submit(
                admission(count, submit, job.params, context, job.what, job.timing, runner.busy)
            )
        return runner.stream(lambda: generation(count, run, job.params, context, job.what, job.timing))

    async def _respond(
        self, request: Request, job: _Job, tokens: TokenStream[int | Delta], stream: bool
    ) -> Response:
        """Wait for the prompt to be accepted (or refused), watching for the client leaving meanwhile; then
        the stream, or the whole body once generated."""
        prefix = "chatcmpl-" if job.kind == "chat" else "cmpl-"
        rid, created, served = prefix + secrets.token_hex(12), int(time.time()), self.replica.served_name
        watch = asyncio.create_task(_cancel_on_disconnect(request, tokens))
        try:
            await tokens.first()
            if not stream:
                text, final, logprobs = await collect(tokens)
        except BaseException:
            tokens.cancel()
            raise
        finally:
            watch.cancel()
        if stream:
            encoder = ChunkEncoder(job.kind, rid, created, served, tools=job.tools, logprobs=job.logprobs)
            return StreamingResponse(
                self._events(tokens, encoder, job),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        lamina = job.timing.as_json(self.replica.model_version)
        body = completion_body(
            job.kind,
            rid,
            created,
            served,
            job.echo + text,
            final,
            lamina,
            logprobs=logprobs if job.logprobs else None,
            tools=job.tools,
        )
        return JSONResponse(body)

    async def _events(
        self, tokens: TokenStream[int | Delta], encoder: ChunkEncoder, job: _Job
    ) -> AsyncIterator[bytes]:
        """The SSE body: opening, one event per token, the final one, the usage event, then [DONE]."""
        delta, usage = encoder.delta, None
        try:
            yield encoder.opening() + (encoder.token(job.echo) if job.echo else b"")
            async for batch in tokens.batches():
                out = []
                for d in batch:
                    if isinstance(d, int):
                        continue
                    out.append(delta(d))
                    if d.finish_reason is not None:
                        usage = d.usage
                yield b"".join(out)
            if usage is None:
                raise UnavailableError("this replica stopped before the answer was complete; retry")
            yield encoder.usage(usage, job.timing.as_json(self.replica.model_version)) + DONE
        except LaminaError as exc:
            yield ChunkEncoder.error(exc.to_body()) + DONE
        except Exception as exc:
            log.exception("stream failed")
            failure = EngineError(f"the engine failed mid-stream ({type(exc).__name__}: {exc}); retry")
            yield ChunkEncoder.error(failure.to_body()) + DONE
        finally:
            tokens.cancel()

    async def embeddings(self, request: Request) -> Response:
        timing = Timing(received=time.perf_counter())
        if (passthrough := self._passthrough()) is not None:
            return await self.passthrough.serve(request, "embedding", passthrough, timing)
        req = await parse_body(request, EmbeddingRequest)
        _, info = self.replica.ready()
        require(info, self.replica.served_name, Capability.EMBEDDING)
        if req.dimensions is not None and req.dimensions != info.embedding_dim:
            raise UnsupportedCapabilityError(
                f"model {self.replica.served_name!r} returns {info.embedding_dim}-dimensional vectors and "
                f"cannot shorten them to {req.dimensions}; leave `dimensions` out",
                param="dimensions",
            )
        done = await self.batcher.embed(req.texts, timing)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
            for i, v in enumerate(done.vectors)
        ]
        lamina = timing.as_json(self.replica.model_version)
        lamina.update(batch_requests=done.batch.requests, batch_texts=done.batch.texts)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": self.replica.served_name,
                "usage": {"prompt_tokens": done.prompt_tokens, "total_tokens": done.prompt_tokens},
                "lamina": lamina,
            }
        )
