"""The semantic cache: an earlier answer to a chat request that means the same as this one (off by default).

A chat request's *scope* is everything but the wording of its last user message: the exact-cache key of
the request with that message's text blanked (so the model and its version, the system prompt, the earlier
turns, the sampling settings, the template and the dataset version all match). Within a scope the last
user message is embedded by the gateway's query embedder, and the nearest earlier request by cosine
similarity is a hit when it reaches ``min_similarity``; its answer is the exact cache's entry under that
request's key (gone from the exact cache: no hit).

The vectors live in the project's vector store (one dataset, ``lamina-cache-semantic``, dropped at start:
the index is a cache). Each stored request is a row whose ``chunk_id`` is its exact key, filtered by its
scope; the index keeps the ``max_entries`` newest rows of this process.

Paraphrase detection by embedding is not exact: sentences with the same words in another order (PAWS
hard negatives) embed very close together. bench/semantic_cache.py measures false hits and true hits by
threshold; the default threshold keeps false hits on those hard negatives at or under 1%.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from lamina.data import AsyncEmbedder, Chunk, VectorStore
from lamina.errors import LaminaError

log = logging.getLogger("lamina.cache")

DATASET = "lamina-cache-semantic"
#: writes between compactions of the index (bench/semantic_cache.py: probe time with and without)
_COMPACT_EVERY = 64


@dataclass(frozen=True)
class SemanticProbe:
    """A request's place in the semantic index, and the nearest earlier request if similar enough."""

    scope: str
    text: str
    vector: Sequence[float]
    #: exact key of the nearest earlier request in the scope at or above the threshold; None: none
    key: str | None = None
    similarity: float | None = None


class SemanticIndex:
    """Vectors of the last user messages of cached requests, by scope, in a vector store."""

    def __init__(
        self,
        store: VectorStore,
        embedder: AsyncEmbedder,
        *,
        min_similarity: float,
        max_entries: int,
        dataset: str = DATASET,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.min_similarity = min_similarity
        self.max_entries = max_entries
        self.dataset = dataset
        self._order: deque[str] = deque()
        self._writes = 0
        self._writing = asyncio.Lock()  # one write at a time: each is a new version of the table
        store.drop(dataset)

    async def probe(self, scope: str, text: str) -> SemanticProbe | None:
        """Embed ``text`` and find its nearest neighbour in ``scope``; None when it cannot be asked."""
        if not text.strip():
            return None
        try:
            vector = (await self.embedder.embed_queries([text]))[0]
            hits = await asyncio.to_thread(self._nearest, scope, vector) if self._order else []
        except LaminaError as exc:
            log.warning("semantic cache lookup failed, answering without it: %s", exc)
            return None
        if hits and hits[0][1] >= self.min_similarity:
            return SemanticProbe(scope, text, vector, key=hits[0][0], similarity=hits[0][1])
        return SemanticProbe(scope, text, vector, similarity=hits[0][1] if hits else None)

    def _nearest(self, scope: str, vector: Sequence[float]) -> list[tuple[str, float]]:
        found = self.store.search(
            self.dataset, query_vector=vector, k=1, mode="vector", filters={"scope": scope}
        )
        return [(h.chunk.chunk_id, h.score) for h in found]

    async def add(self, probe: SemanticProbe, key: str) -> None:
        """Remember that the request of ``probe`` is cached under ``key``."""
        chunk = Chunk(
            chunk_id=key,
            dataset=self.dataset,
            version="cache",
            text=probe.text,
            source_uri="lamina:cache",
            byte_start=0,
            byte_end=len(probe.text.encode()),
            content_sha256=key,
            metadata={"scope": probe.scope, "added": time.time()},
            vector=list(probe.vector),
        )
        async with self._writing:
            self._order.append(key)
            drop = [self._order.popleft() for _ in range(max(0, len(self._order) - self.max_entries))]
            self._writes += 1
            await asyncio.to_thread(self._write, chunk, drop, self._writes % _COMPACT_EVERY == 0)

    def _write(self, chunk: Chunk, drop: list[str], compact: bool) -> None:
        self.store.upsert(self.dataset, [chunk])
        if drop:
            self.store.delete(self.dataset, drop)
        if compact:  # each write adds a fragment, and searches slow down with their number
            self.store.reindex(self.dataset)

    async def aclose(self) -> None:
        return None
