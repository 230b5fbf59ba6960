"""The response cache: an answer computed once is given again to the same request, without dispatching.

**What is cached.** Deterministic requests: chat and text completions with ``temperature`` 0 or a
``seed`` (and no ``logprobs``, whose replay would be lossy). A client overrides it per request with the
header ``x-lamina-cache``: ``use`` (cache this one too, e.g. an embeddings call or a sampled answer worth
reusing), ``no-cache`` (do not answer from the cache, but store the new answer), ``no-store`` (neither).
Only complete, successful answers are stored: a replica's error, a stream that broke off or carried an
error event, an answer an output guard blocked, a call the client left are never stored. Every answered
request says ``x-lamina-cache: hit``, ``miss`` or ``bypass``.

**The key** is the SHA-256 of the canonical JSON (sorted keys, no spaces) of the request as the replica
gets it (after the gateway's RAG rewrite), with the fields that cannot change the answer taken out:
``model`` (the deployment and its model version stand for it, so ``NAME`` and ``NAME@1`` share entries),
``stream`` and ``stream_options`` (a streamed answer serves a plain request and back), ``user``,
``metadata``, ``store``; integer sampling numbers are written as floats (``0`` and ``0.0`` are one key).
Defaults are not filled in: ``top_p`` absent and ``top_p: 1`` are two keys. Added to it: the operation,
the deployment and its model version, the prompt-template version (``Call.template``, set by
the template step), the dataset version a RAG request's retrieval resolved to for this request (so an
answer grounded in an older version is not served once the dataset has a new one), and a salt from the
guard configuration (a changed guard never meets answers checked by the old one). The key does not
include the caller: an answer does not depend on who asks, and the key's model and dataset permissions
are checked before the lookup.

**Policies on a hit.** A hit costs no compute: the cost policy does not admit it and nothing is charged
(``usage`` is the stored one, without ``cost``). It still counts as a request against the rate limits
(rpm) but reserves no tokens (tpm): the limits protect the gateway as well as the replicas, and tokens
measure model work, which a hit does not do. Input guards do not run on a hit: the stored answer was
admitted by the same guards (see the salt).

**Cost.** The miss path is one canonical ``json.dumps`` and one SHA-256 of the request plus one backend
lookup (a dict in process); see the README for the measured CPU time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from starlette.responses import JSONResponse, Response

from lamina.application._cache_answers import plain_answer, plain_entry, stream_answer, stream_entry
from lamina.application._cache_semantic import SemanticIndex, SemanticProbe
from lamina.application._cache_store import (
    Bounds,
    CacheBackend,
    Clock,
    MemoryBackend,
    RedisBackend,
    StoreBackend,
)
from lamina.application._policy import Admission, Call, Policy, Usage, for_cached_answers
from lamina.application._rag import citations_event, last_user_text
from lamina.config import CacheConfig
from lamina.data import Retrieval
from lamina.errors import ConflictError, InvalidRequestError, LaminaError
from lamina.store import Store

log = logging.getLogger("lamina.cache")

HEADER = "x-lamina-cache"
Status = Literal["hit", "miss", "bypass"]
#: request fields that do not change the answer (see the module doc)
_IGNORED = frozenset({"model", "stream", "stream_options", "user", "metadata", "store"})
_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
#: seconds a failing backend (Redis down, the store locked) is not asked again
_RETRY_AFTER_S = 5.0
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(frozen=True)
class Decision:
    """What one request does with the cache."""

    lookup: bool
    store: bool


def decide(header: str | None, call: Call) -> Decision:
    """Pure: the request's use of the cache from its ``x-lamina-cache`` header and its body."""
    if header is not None:
        asked = header.strip().lower()
        if asked == "use":
            return Decision(lookup=True, store=True)
        if asked == "no-cache":
            return Decision(lookup=False, store=True)
        if asked == "no-store":
            return Decision(lookup=False, store=False)
        raise InvalidRequestError(
            f"the header {HEADER}: {header!r} is not one of use, no-cache, no-store; send one of them, or "
            "leave the header out to cache deterministic requests (temperature 0 or a seed) only",
            param=HEADER,
        )
    body = call.body
    deterministic = (
        call.operation in ("chat", "text_completion")
        and (body.get("temperature") == 0 or body.get("seed") is not None)
        and not body.get("logprobs")
    )
    return Decision(lookup=deterministic, store=deterministic)


def request_key(call: Call, dataset_version: str | None, salt: str = "") -> str:
    """The exact-cache key of ``call`` (see the module doc)."""
    body = {k: v for k, v in call.body.items() if k not in _IGNORED}
    for name in _FLOATS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            body[name] = float(value)
    material = [
        1,
        call.operation,
        call.deployment,
        call.model_version,
        call.template,
        dataset_version,
        salt,
        body,
    ]
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """The gateway's cache: a backend of entries, the optional semantic index, and the guard salt."""

    def __init__(
        self, backend: CacheBackend, *, salt: str = "", semantic: SemanticIndex | None = None
    ) -> None:
        self.backend = backend
        self.semantic = semantic
        self.salt = hashlib.sha256(salt.encode()).hexdigest()[:16] if salt else ""
        self._down_until = 0.0

    async def lookup(self, call: Call, header: str | None, dataset_version: str | None) -> CacheLookup:
        decision = decide(header, call)
        if not (decision.lookup or decision.store):
            return CacheLookup(self, call, None, "bypass")
        key = request_key(call, dataset_version, self.salt)
        lookup = CacheLookup(
            self, call, key if decision.store else None, "miss" if decision.lookup else "bypass"
        )
        if not decision.lookup:
            return lookup
        lookup.entry = await self._get(key)
        if lookup.entry is None and self.semantic is not None:
            lookup.probe = await self._probe(call, dataset_version)
            if lookup.probe is not None and lookup.probe.key is not None:
                lookup.entry = await self._get(lookup.probe.key)
                if lookup.entry is not None:  # a semantic hit says how close it was
                    similarity = f"{lookup.probe.similarity:.4f}"
                    call.headers["x-lamina-cache-similarity"] = similarity
                    call.span.set_attribute("lamina.cache.similarity", float(similarity))
        if lookup.entry is not None:
            lookup.status = "hit"
        return lookup

    async def _probe(self, call: Call, dataset_version: str | None) -> SemanticProbe | None:
        """The semantic index's nearest earlier chat request in this one's scope (see _cache_semantic)."""
        messages = call.body.get("messages")
        if self.semantic is None or call.operation != "chat" or not isinstance(messages, list):
            return None
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
        if last is None:
            return None
        blanked = [*messages[:last], {**messages[last], "content": ""}, *messages[last + 1 :]]
        scope = request_key(
            replace(call, body={**call.body, "messages": blanked}), dataset_version, self.salt
        )
        return await self.semantic.probe(scope, last_user_text(messages))

    async def _get(self, key: str) -> bytes | None:
        if self._down_until > time.monotonic():
            return None
        try:
            return await self.backend.get(key)
        except LaminaError as exc:  # a cache that is down is a miss, not a failed request
            self._failed("lookup", exc)
            return None

    async def put(self, key: str, entry: bytes, probe: SemanticProbe | None) -> None:
        if self._down_until > time.monotonic():
            return
        try:
            await self.backend.put(key, entry)
            if probe is not None and self.semantic is not None:
                await self.semantic.add(probe, key)
        except ConflictError:  # another gateway stored the same answer at the same time: it is stored
            return
        except LaminaError as exc:
            self._failed("store", exc)

    def _failed(self, what: str, exc: LaminaError) -> None:
        """A failing backend is left alone for a while, so that requests do not each wait on it."""
        self._down_until = time.monotonic() + _RETRY_AFTER_S
        log.warning(
            "response cache %s failed; answering without the cache for %.0f s: %s", what, _RETRY_AFTER_S, exc
        )

    async def aclose(self) -> None:
        await self.backend.aclose()
        if self.semantic is not None:
            await self.semantic.aclose()


class CacheLookup:
    """One request's use of the cache: its status, the entry found, and how to store its answer."""

    def __init__(
        self, cache: ResponseCache | None, call: Call, key: str | None, status: Status | None
    ) -> None:
        self._cache = cache
        self.call = call
        #: where the answer is stored; None: it is not
        self.key = key
        self.status = status
        self.entry: bytes | None = None
        self.probe: SemanticProbe | None = None
        if status is not None:
            call.headers[HEADER] = status
            call.span.set_attribute("lamina.cache", status)

    @property
    def stores(self) -> bool:
        return self._cache is not None and self.key is not None

    async def replay(
        self,
        policies: Sequence[Policy],
        include_usage: bool,
        extra: Mapping[str, object],
        grounding: Retrieval | None,
    ) -> Response:
        """The response of a hit: admitted by the rate limits alone, as one request with no tokens."""
        assert self.entry is not None
        counted = replace(self.call, prompt_tokens=0, completion_tokens=0)
        admission = await Admission.of(counted, for_cached_answers(policies))
        await admission.settle(Usage(prompt_tokens=0, completion_tokens=0))
        headers = {**self.call.headers, HEADER: "hit"}
        if self.call.stream:
            trailer = None if grounding is None else citations_event(grounding)
            content = stream_answer(self.entry, include_usage, trailer)
            return Response(
                content, media_type="text/event-stream; charset=utf-8", headers={**headers, **_SSE_HEADERS}
            )
        return JSONResponse({**plain_answer(self.entry), **extra}, headers=headers)

    async def store_plain(self, body: Mapping[str, Any]) -> None:
        """Store a plain answer as its client gets it (citations and the policies' usage fields aside)."""
        if self._cache is None or self.key is None:
            return
        entry = plain_entry(body, self.call.usage_extra)
        if entry is not None:
            await self._cache.put(self.key, entry, self.probe)

    async def store_stream(self, sent: bytes, usage: Mapping[str, Any] | None) -> None:
        """Store a complete stream from the bytes its client got and the replica's usage."""
        if self._cache is None or self.key is None:
            return
        try:
            entry = stream_entry(sent, usage)
        except ValueError as exc:  # not what a replica streams: not stored
            log.warning("a stream's events could not be assembled for the response cache: %s", exc)
            return
        if entry is not None:
            await self._cache.put(self.key, entry, self.probe)


async def cache_lookup(
    cache: ResponseCache | None, call: Call, headers: Mapping[str, str], grounding: Retrieval | None
) -> CacheLookup:
    """The gateway's one call before admission: a lookup that knows how to store the answer (a no-op one
    when the gateway has no cache). A RAG request's key has the dataset version its retrieval resolved to."""
    if cache is None:
        return CacheLookup(None, call, None, None)
    version = None if grounding is None else grounding.version.version_id
    return await cache.lookup(call, headers.get(HEADER), version)


def response_cache(
    config: CacheConfig,
    store: Store,
    *,
    salt: str = "",
    semantic: SemanticIndex | None = None,
    clock: Clock | None = None,
) -> ResponseCache | None:
    """The cache ``config`` asks for (None when it is off)."""
    if not config.enabled:
        return None
    bounds = Bounds(config.ttl_s, config.max_entries, config.max_bytes)
    clocked: dict[str, Any] = {} if clock is None else {"clock": clock}
    backend: CacheBackend
    if config.backend == "redis":
        assert config.url is not None
        backend = RedisBackend(config.url, bounds, **clocked)
    elif config.backend == "store":
        backend = StoreBackend(store, bounds, **clocked)
    else:
        backend = MemoryBackend(bounds, **clocked)
    return ResponseCache(backend, salt=salt, semantic=semantic)
