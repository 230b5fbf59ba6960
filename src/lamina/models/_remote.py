"""The ``openai`` engine: a remote OpenAI-compatible API (OpenAI, vLLM, llama-server, Ollama) served as a
deployment like any other.

The client's body goes upstream as the client sent it, with ``model`` replaced by the upstream's name, so
tools, ``response_format``, log probabilities and any newer field are for the upstream to honour or refuse.
Streams always ask for usage (``stream_options.include_usage``), so that the replica can account for them.

It is a :class:`~lamina.models._engine.PassthroughEngine`: the worker awaits it on its event loop, so up
to ``max_concurrency`` requests are in flight at once over one pooled ``httpx.AsyncClient``; the engine
thread, which serialises a local model's requests, is never used. Rejected alternative: sync calls on a
thread pool, which would hold a thread per waiting request and could not be cancelled mid-request when the
client leaves; here cancelling the awaiting task closes the upstream connection.

Upstream failures become Lamina errors that say which upstream failed and what to do; the upstream's
status is in the error's ``details``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import httpx

from lamina.errors import (
    ConfigError,
    InvalidRequestError,
    LaminaError,
    PayloadTooLargeError,
    RateLimitError,
    UnsupportedCapabilityError,
    UpstreamError,
    UpstreamTimeoutError,
)
from lamina.models._engine import (
    ChatMessage,
    Delta,
    EmbeddingBatch,
    EngineInfo,
    LoadSpec,
    Operation,
    SamplingParams,
    Started,
)
from lamina.models._remote_options import OPENAI_CAPABILITIES, OpenAIOptions

_PATHS: dict[Operation, str] = {
    "chat": "/chat/completions",
    "completion": "/completions",
    "embedding": "/embeddings",
}
#: how much of a non-JSON error answer is quoted in the error message
_QUOTE_CHARS = 300


def api_key(options: OpenAIOptions, environ: Mapping[str, str]) -> str | None:
    """The key from the variable named by ``api_key_env``; a ConfigError naming it when it is unset."""
    if options.api_key_env is None:
        return None
    key = environ.get(options.api_key_env, "")
    if not key.strip():
        raise ConfigError(
            f"the openai engine's `api_key_env` names ${options.api_key_env}, which is not set (or empty) in "
            f"the environment of this replica; export {options.api_key_env}=<key for {options.base_url}> "
            "before `lamina up`, or leave `api_key_env` out for an upstream that needs no key"
        )
    return key.strip()


def upstream_failure(
    options: OpenAIOptions, status: int, content: bytes, headers: httpx.Headers | None = None
) -> LaminaError:
    """The Lamina error an upstream's error answer stands for, quoting the upstream's message."""
    message, param = _error_text(content)
    said = f"HTTP {status}: {message}"
    where = options.base_url
    if status in (401, 403):
        if options.api_key_env is None:
            return UpstreamError(
                f"the upstream {where} wants an API key ({said}); put one in an environment variable and "
                "name it in the deployment's `api_key_env`",
                upstream_status=status,
            )
        return UpstreamError(
            f"the upstream {where} rejected the API key in ${options.api_key_env} ({said}); set "
            f"{options.api_key_env} to a valid key for it and restart the deployment",
            upstream_status=status,
        )
    if status == 429:
        retry = (headers or httpx.Headers()).get("retry-after")
        return RateLimitError(
            f"the upstream {where} is rate limiting this deployment ({said}); retry "
            + (f"after {retry} s" if retry else "later"),
            headers={"Retry-After": retry} if retry else None,
            upstream_status=status,
        )
    if status == 413:
        return PayloadTooLargeError(
            f"the upstream {where} refused the request as too large ({said})", upstream_status=status
        )
    if status in (400, 422):
        return InvalidRequestError(
            f"the upstream {where} refused the request ({said}); fix it and send it again",
            param=param,
            upstream_status=status,
        )
    if status == 404:
        return UpstreamError(
            f"the upstream {where} has no such model or endpoint ({said}); check the deployment's `model` "
            f"({options.model!r}) and `base_url`",
            upstream_status=status,
        )
    return UpstreamError(
        f"the upstream {where} failed ({said}); retry, or check the upstream", upstream_status=status
    )


def _error_text(content: bytes) -> tuple[str, str | None]:
    """An error answer's message and ``param``: OpenAI's ``{"error": {...}}``, else the text itself."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            param = err.get("param")
            return str(err["message"]), param if isinstance(param, str) else None
        if isinstance(err, str):
            return err, None
    text = content.decode("utf-8", errors="replace").strip()
    return (text[:_QUOTE_CHARS] + ("..." if len(text) > _QUOTE_CHARS else "")) or "no body", None


def _transport_failure(options: OpenAIOptions, exc: httpx.HTTPError) -> LaminaError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeoutError(
            f"the upstream {options.base_url} did not answer within timeout_s={options.timeout_s:g} s "
            f"({type(exc).__name__}); retry, or raise the deployment's `timeout_s`"
        )
    return UpstreamError(
        f"cannot talk to the upstream {options.base_url} ({type(exc).__name__}: {exc}); check `base_url` "
        "and that the upstream is up"
    )


class OpenAIEngine:
    """One upstream model behind a pool of at most ``max_concurrency`` connections."""

    def __init__(self, spec: LoadSpec, environ: Mapping[str, str] | None = None) -> None:
        self.options = OpenAIOptions.model_validate(spec.options)
        key = api_key(self.options, os.environ if environ is None else environ)
        headers = dict(self.options.headers)
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        limit = self.options.max_concurrency
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.options.timeout_s),
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        )
        #: requests past it wait here (the time counts as queue time), never in the pool's own queue
        self._slots = asyncio.Semaphore(limit)

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="openai",
            capabilities=OPENAI_CAPABILITIES,
            # the upstream's own; it refuses what does not fit
            context_length=0,
            device="remote",
            details={
                "base_url": self.options.base_url,
                "upstream_model": self.options.model,
                "max_concurrency": str(self.options.max_concurrency),
            },
        )

    async def answer(self, op: Operation, body: dict[str, Any], started: Started) -> dict[str, Any]:
        async with self._slots:
            started.begin()
            try:
                response = await self._client.post(self._url(op), json=self._upstream_body(body, False))
            except httpx.HTTPError as exc:
                raise _transport_failure(self.options, exc) from exc
        if response.status_code >= 400:
            raise upstream_failure(self.options, response.status_code, response.content, response.headers)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamError(
                f"the upstream {self.options.base_url} answered HTTP {response.status_code} with something "
                "that is not a JSON object; check that `base_url` is an OpenAI-compatible API root"
            )
        return answer

    async def stream(
        self, op: Operation, body: dict[str, Any], started: Started
    ) -> AsyncIterator[dict[str, Any]]:
        async with self._slots:
            started.begin()
            request = self._client.build_request("POST", self._url(op), json=self._upstream_body(body, True))
            try:
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise _transport_failure(self.options, exc) from exc
            try:
                if response.status_code >= 400:
                    content = await self._read(response)
                    raise upstream_failure(self.options, response.status_code, content, response.headers)
                async for chunk in self._chunks(response):
                    yield chunk
            finally:
                await response.aclose()

    async def _read(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError as exc:
            raise _transport_failure(self.options, exc) from exc

    async def _chunks(self, response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        """The JSON payloads of the upstream's server-sent events, up to ``[DONE]``."""
        data: list[str] = []
        try:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                    continue
                if line or not data:
                    continue  # comments, ``event:``/``id:`` fields, keep-alive blank lines
                payload, data = "\n".join(data), []
                if payload.strip() == "[DONE]":
                    return
                yield self._chunk(payload)
        except httpx.HTTPError as exc:
            raise _transport_failure(self.options, exc) from exc
        if data and "\n".join(data).strip() != "[DONE]":
            yield self._chunk("\n".join(data))

    def _chunk(self, payload: str) -> dict[str, Any]:
        try:
            chunk = json.loads(payload)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            raise UpstreamError(
                f"the upstream {self.options.base_url} sent a stream event that is not a JSON object "
                f"({payload[:_QUOTE_CHARS]!r}); check that it is an OpenAI-compatible API"
            )
        if "error" in chunk:
            status = chunk.get("status")
            raise upstream_failure(self.options, status if isinstance(status, int) else 500, payload.encode())
        return chunk

    def _url(self, op: Operation) -> str:
        return self.options.base_url + _PATHS[op]

    def _upstream_body(self, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        upstream = {**body, "model": self.options.model}
        if stream:
            asked = body.get("stream_options")
            upstream["stream_options"] = {**(asked if isinstance(asked, dict) else {}), "include_usage": True}
        return upstream

    async def aclose(self) -> None:
        await self._client.aclose()

    # the engine-thread interface: never used, the worker serves a passthrough engine on its event loop
    def _not_here(self) -> NoReturn:
        raise UnsupportedCapabilityError(
            "the openai engine answers through the worker's passthrough path only; send the request to the "
            "replica's HTTP endpoints"
        )

    def count_tokens(self, text: str) -> int:
        self._not_here()

    def count_chat_tokens(self, messages: Sequence[ChatMessage]) -> int:
        self._not_here()

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Iterator[Delta]:
        self._not_here()

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        self._not_here()

    def embed(self, texts: Sequence[str]) -> EmbeddingBatch:
        self._not_here()

    def close(self) -> None:
        """Nothing left to do: :meth:`aclose` let go of the connections on the event loop."""
