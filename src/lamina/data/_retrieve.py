"""Retrieval over a pinned dataset version, answered with citations that lead back to the source lines.

A retrieval resolves ``NAME[@VERSION|@TAG|@SEQ]`` to one immutable version (its chunk ids), embeds the
query (unless the search is keyword-only), and searches the vector store within exactly that version's
chunks. Every hit becomes a :class:`Citation`: chunk id, source URI, byte span and content hash, and the
version it was retrieved from, so an answer built on it can be traced to the data it used.

The query embedder is asynchronous (the gateway embeds through a replica of the embedding deployment);
the vector store is synchronous and runs in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import anyio

from lamina.data.vectors import Hit, Scalar, SearchMode, VectorStore
from lamina.data.versions import PinnedVersion
from lamina.errors import ConflictError, InvalidRequestError, LaminaError

_log = logging.getLogger(__name__)


class VersionResolver(Protocol):
    """Resolves ``NAME[@V]`` to a kept version; unknown names or versions raise NotFoundError."""

    def pin(self, ref: str) -> PinnedVersion: ...


class AsyncEmbedder(Protocol):
    """Embeds query texts into unit vectors (the gateway's implementation goes through a replica)."""

    async def embed_queries(self, texts: Sequence[str]) -> list[list[float]]: ...


@dataclass(frozen=True)
class Citation:
    """Where a retrieved passage came from, precisely enough to find its bytes again."""

    index: int
    chunk_id: str
    text: str
    score: float
    source_uri: str
    byte_start: int
    byte_end: int
    content_sha256: str
    dataset: str
    dataset_version: str
    dataset_seq: int
    metadata: dict[str, Scalar] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Retrieval:
    """The answer to one query: the version searched and its citations, best first."""

    query: str
    mode: SearchMode
    version: PinnedVersion
    citations: list[Citation]
    #: the query's embedding (None for keyword-only searches); the drift window samples it
    query_vector: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "lamina.retrieval",
            "query": self.query,
            "mode": self.mode,
            "dataset": self.version.dataset,
            "dataset_version": self.version.version_id,
            "dataset_seq": self.version.seq,
            "data": [c.to_json() for c in self.citations],
        }


def citations(hits: Sequence[Hit], version: PinnedVersion) -> list[Citation]:
    return [
        Citation(
            index=i,
            chunk_id=h.chunk.chunk_id,
            text=h.chunk.text,
            score=h.score,
            source_uri=h.chunk.source_uri,
            byte_start=h.chunk.byte_start,
            byte_end=h.chunk.byte_end,
            content_sha256=h.chunk.content_sha256,
            dataset=version.dataset,
            dataset_version=version.version_id,
            dataset_seq=version.seq,
            metadata=dict(h.chunk.metadata),
        )
        for i, h in enumerate(hits, start=1)
    ]


class Retriever:
    """Searches pinned dataset versions; the gateway's ``/v1/retrieve`` and RAG use it."""

    def __init__(
        self,
        versions: VersionResolver,
        store: VectorStore,
        embedder: AsyncEmbedder,
        query_model: str | None = None,
        embedder_for: Callable[[str], AsyncEmbedder | None] | None = None,
    ) -> None:
        """``query_model``: ``name@version`` of the model ``embedder`` runs. Queries of a version are
        embedded by ``embedder_for(the model it was embedded with)`` where that gives one (the stack's
        follows rollouts: a version embedded with a new model is searched with it, an older one with its
        own); else by ``embedder`` if the version's model is ``query_model``; else vector and hybrid search
        of the version are refused (its vectors live in another space)."""
        self._versions = versions
        self._store = store
        self._embedder = embedder
        self._query_model = query_model
        self._embedder_for = embedder_for

    async def retrieve(
        self,
        ref: str,
        query: str,
        *,
        k: int = 10,
        mode: SearchMode = "hybrid",
        filters: Mapping[str, Scalar] | None = None,
    ) -> Retrieval:
        if not query.strip():
            raise InvalidRequestError("the query is empty; send the text to search for", param="query")
        version = await anyio.to_thread.run_sync(self._versions.pin, ref)
        vector = None if mode == "keyword" else (await self._embedder_of(version).embed_queries([query]))[0]
        hits = await anyio.to_thread.run_sync(lambda: self._search(version, query, vector, k, mode, filters))
        return Retrieval(query, mode, version, citations(hits, version), query_vector=vector)

    def warm(self, refs: Sequence[str]) -> list[str]:
        """Pin each of ``refs`` and load its dataset's index, so the first requests do not pay for it
        (a 100k-chunk graph takes about a second to load). Returns the refs that failed, logged."""
        failed = []
        for ref in refs:
            try:
                self._store.warm(self._versions.pin(ref).dataset)
            except LaminaError as exc:
                _log.warning("could not warm %s: %s", ref, exc)
                failed.append(ref)
        return failed

    def _embedder_of(self, version: PinnedVersion) -> AsyncEmbedder:
        """What embeds queries into the space of ``version``'s vectors."""
        model, query_model = version.embedding_model, self._query_model
        found = None if model is None or self._embedder_for is None else self._embedder_for(model)
        if found is not None:
            return found
        if model is None or query_model is None or model == query_model:
            return self._embedder
        raise ConflictError(
            f"{version.ref} was embedded with {model}, which no deployment serves and the registry does not "
            f"hold, and queries here are embedded with {query_model}: search it with mode=keyword, deploy "
            f"{model}, or ingest it again with data.embedding_model: {query_model}",
            param="dataset",
        )

    def _search(
        self,
        version: PinnedVersion,
        query: str,
        vector: list[float] | None,
        k: int,
        mode: SearchMode,
        filters: Mapping[str, Scalar] | None,
    ) -> list[Hit]:
        if not version.chunk_ids:
            return []
        return self._store.search(
            version.dataset,
            query_text=query,
            query_vector=vector,
            k=k,
            mode=mode,
            filters=filters,
            chunk_ids=version.chunk_ids,
        )
