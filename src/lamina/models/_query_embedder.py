"""Query embeddings through the running stack: a replica of the embedding deployment answers them.

The gateway uses this for retrieval, so query vectors come from exactly the model version that embedded
the dataset (the composition root checks the names match) and the embedding model is loaded once, in its
own replica process, not again inside the gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import anyio

from lamina.errors import EngineError, from_body
from lamina.orchestration import Dispatcher


class SyncEmbedder(Protocol):
    def embed(self, texts: Sequence[str]) -> Sequence[Sequence[float]]: ...


class DispatchQueryEmbedder:
    """The data layer's AsyncEmbedder port, answered by a replica through the dispatcher."""

    def __init__(self, dispatcher: Dispatcher, deployment: str, version: str | None = None) -> None:
        """``version``: the model ``name@version`` the vectors must come from (during a rollout of the
        deployment, its replicas are asked, not the other version's)."""
        self._dispatcher = dispatcher
        self._deployment = deployment
        self._version = version

    async def embed_queries(self, texts: Sequence[str]) -> list[list[float]]:
        body = {"model": self._deployment, "input": list(texts), "encoding_format": "float"}
        result = await self._dispatcher.request(
            self._deployment, "/v1/embeddings", body, version=self._version
        )
        response = result.response
        payload = response.json() if response.content else {}
        if response.status_code >= 400:
            raise from_body(response.status_code, payload if isinstance(payload, dict) else {})
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list) or len(data) != len(texts):
            raise EngineError(
                f"the embedding replica {result.replica_id} answered without one vector per text; its log "
                "says why"
            )
        ordered = sorted(data, key=lambda d: int(d["index"]))
        return [[float(x) for x in d["embedding"]] for d in ordered]


class ThreadQueryEmbedder:
    """The AsyncEmbedder port on an in-process embedder (when no deployment serves the dataset's model).

    The embedder is made on first use (loading the model), and runs in a worker thread.
    """

    def __init__(self, make: Callable[[], SyncEmbedder]) -> None:
        self._make = make
        self._embedder: SyncEmbedder | None = None

    async def embed_queries(self, texts: Sequence[str]) -> list[list[float]]:
        return await anyio.to_thread.run_sync(self._embed, list(texts))

    def _embed(self, texts: list[str]) -> list[list[float]]:
        if self._embedder is None:
            self._embedder = self._make()
        return [list(map(float, v)) for v in self._embedder.embed(texts)]
