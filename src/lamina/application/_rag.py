"""Retrieval-augmented answers: ``POST /v1/retrieve``, and chat completions grounded in a dataset version.

A chat completion asks for context with the request extension field ``rag``::

    {"model": "smollm2-135m-instruct", "messages": [...],
     "rag": {"dataset": "docs@prod", "k": 4, "mode": "hybrid", "filters": {"lang": "en"}}}

or by naming a RAG alias from the config as its ``model``. The gateway retrieves from exactly one pinned
dataset version (span ``retrieve``, layer data, with the chunk ids it cited), puts the numbered passages
in a system message, and answers with ``citations``: chunk ids, source URIs and byte spans, and the dataset
version. A streamed answer carries them in one extra event just before ``data: [DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from lamina.application._ports import ModelCatalog, Route
from lamina.data import Retrieval, Scalar, SearchMode
from lamina.errors import ModelNotFoundError
from lamina.models import ModelCard
from lamina.observability import Layer, Telemetry

_INSTRUCTION = (
    "Answer the user's question using the numbered context passages below. Cite the passages you use "
    "as [1], [2], ... If the passages do not contain the answer, say that you do not know."
)


class Retriever(Protocol):
    async def retrieve(
        self,
        ref: str,
        query: str,
        *,
        k: int = 10,
        mode: SearchMode = "hybrid",
        filters: Mapping[str, Scalar] | None = None,
    ) -> Retrieval: ...


class QuerySink(Protocol):
    """Receives each retrieval (e.g. the drift window, which samples the query embeddings)."""

    def record(self, retrieval: Retrieval) -> None: ...


class RagOptions(BaseModel):
    """The ``rag`` request extension field, and the settings of a RAG alias."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dataset: str = Field(min_length=1, description="NAME, NAME@SEQ, NAME@TAG or NAME@VERSION_ID.")
    k: int = Field(4, ge=1, le=50, description="Passages to put in the context.")
    mode: Literal["vector", "keyword", "hybrid"] = Field("hybrid", description="How to search.")
    filters: dict[str, str | int | float | bool] | None = Field(
        None, description="Metadata equality filters."
    )


class RetrieveRequest(BaseModel):
    """``POST /v1/retrieve``."""

    model_config = ConfigDict(extra="forbid")
    dataset: str = Field(min_length=1)
    query: str = Field(min_length=1)
    k: int = Field(10, ge=1, le=200)
    mode: Literal["vector", "keyword", "hybrid"] = "hybrid"
    filters: dict[str, str | int | float | bool] | None = None


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def grounded_messages(messages: Sequence[Mapping[str, Any]], retrieval: Retrieval) -> list[dict[str, Any]]:
    """The conversation with the retrieved passages as numbered context in the (first) system message."""
    passages = "\n\n".join(
        f"[{c.index}] (source: {c.source_uri}, bytes {c.byte_start}-{c.byte_end})\n{c.text}"
        for c in retrieval.citations
    )
    context = f"{_INSTRUCTION}\n\nContext:\n{passages or '(no passage matched)'}"
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = f"{out[0]['content']}\n\n{context}"
    else:
        out.insert(0, {"role": "system", "content": context})
    return out


def citations_json(retrieval: Retrieval) -> list[dict[str, Any]]:
    return [c.to_json() for c in retrieval.citations]


def citations_event(retrieval: Retrieval) -> bytes:
    """The extra SSE event of a streamed grounded answer (sent just before ``data: [DONE]``)."""
    body = {
        "object": "lamina.citations",
        "choices": [],
        "citations": citations_json(retrieval),
        "dataset_version": retrieval.version.version_id,
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def retrieve_traced(
    telemetry: Telemetry, retriever: Retriever, options: RagOptions, query: str
) -> Retrieval:
    """Retrieve under a ``retrieve`` span (layer data) that records the version and every chunk cited."""
    with telemetry.span("retrieve", Layer.DATA, {"lamina.dataset.ref": options.dataset}) as span:
        result = await retriever.retrieve(
            options.dataset, query, k=options.k, mode=options.mode, filters=options.filters
        )
        span.set_attributes(
            {
                "lamina.dataset": result.version.dataset,
                "lamina.dataset.version": result.version.version_id,
                "lamina.dataset.seq": result.version.seq,
                "lamina.retrieval.mode": result.mode,
                "lamina.retrieval.chunk_ids": [c.chunk_id for c in result.citations],
                "lamina.retrieval.sources": sorted({c.source_uri for c in result.citations}),
            }
        )
    return result


#: what a RAG alias cannot do that its model may: it answers chat completions only
_NOT_THROUGH_AN_ALIAS = frozenset({"completion", "embedding"})


class AliasCatalog:
    """The gateway's catalog with its RAG aliases in it: ``GET /v1/models`` lists each alias (the card of
    the model it answers with, chat only), so clients that pick from the list (Open WebUI, LibreChat, an
    SDK's ``models.list()``) find it, and an unknown name's error lists them too."""

    def __init__(self, inner: ModelCatalog, aliases: Mapping[str, tuple[str, RagOptions]]) -> None:
        self.inner = inner
        self.aliases = dict(aliases)

    def models(self) -> list[ModelCard]:
        cards = self.inner.models()
        by_id = {c.id: c for c in cards}
        for name, (model, _) in self.aliases.items():
            target = by_id.get(model)
            if target is None or name in by_id:
                continue
            capabilities = [c for c in target.capabilities if c not in _NOT_THROUGH_AN_ALIAS]
            cards.append(target.model_copy(update={"id": name, "capabilities": capabilities}))
        return cards

    def resolve(self, name: str) -> Route:
        alias = self.aliases.get(name)
        try:
            return self.inner.resolve(name if alias is None else alias[0])
        except ModelNotFoundError:
            if alias is not None:
                raise
            available = ", ".join(sorted(c.id for c in self.models())) or "none"
            raise ModelNotFoundError(
                f"the model {name!r} does not exist; available models: {available}", param="model"
            ) from None
