"""A cached RAG answer is served only while its dataset resolves to the version it was grounded in.

The smallest real setup: files ingested by the real pipeline into a real dataset catalog (SQLite) and
LanceDB, a real Retriever over them (keyword search; the hashing embedder stands for the model), the
gateway with an in-process response cache, and the gateway tests' ReplayDispatcher as the replica.
A second ingest makes a new dataset version whose passages for the question are the same: the request
the replica would get is identical, yet the cached answer is not served, because the key holds the
version the dataset resolves to now.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lamina.application import GatewayDeps, create_app, response_cache
from lamina.config import CacheConfig
from lamina.data import LanceDBStore, Retriever
from lamina.data.ingest import IngestOptions, IngestPipeline, LineageEmitter
from lamina.data.versions import DatasetCatalog
from lamina.observability import Telemetry
from lamina.store import Store
from tests.support import CHAT, HashingEmbedder, ReplayDispatcher, StaticCatalog

pytestmark = pytest.mark.anyio

OPTIONS = IngestOptions(chunk_size=48, chunk_overlap=8, embed_batch_size=8)


class Queries:
    """The AsyncEmbedder port on the hashing embedder the chunks were embedded with."""

    def __init__(self, embedder: HashingEmbedder) -> None:
        self.embedder = embedder

    async def embed_queries(self, texts: Sequence[str]) -> list[list[float]]:
        return self.embedder.embed(texts)


@dataclass
class Rig:
    client: httpx.AsyncClient
    dispatcher: ReplayDispatcher
    root: Path
    ingest: Any


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "tea.md").write_text("Green tea should steep for two minutes in water just below boiling.\n")
    (root / "bread.md").write_text("Sourdough bread rises slowly because wild yeast ferments the dough.\n")
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    catalog = DatasetCatalog(store)
    vectors = LanceDBStore(tmp_path / "vectors")
    embedder = HashingEmbedder()
    pipeline = IngestPipeline(catalog, vectors, embedder, LineageEmitter(tmp_path / "lineage.jsonl"))

    def ingest() -> str:
        version = pipeline.ingest([str(root)], "docs", OPTIONS).version
        assert version is not None
        return version.version_id

    ingest()
    telemetry = Telemetry(service_name="cache-versions", store=None, otlp_endpoint=None)
    dispatcher = ReplayDispatcher()
    cache = response_cache(CacheConfig(enabled=True), store)  # in process (the default backend)
    assert cache is not None
    deps = GatewayDeps(
        StaticCatalog(),
        dispatcher,
        lambda: {},
        telemetry,
        retriever=Retriever(catalog, vectors, Queries(embedder)),
        cache=cache,
    )
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield Rig(client, dispatcher, root, ingest)
    await cache.aclose()
    telemetry.shutdown()
    vectors.close()
    store.close()


def ask(dataset: str = "docs") -> dict[str, Any]:
    return {
        "model": CHAT,
        "messages": [{"role": "user", "content": "how long should green tea steep"}],
        "temperature": 0,
        "rag": {"dataset": dataset, "k": 1, "mode": "keyword"},
    }


async def test_a_new_dataset_version_retires_the_answers_grounded_in_the_old_one(rig: Rig) -> None:
    first = await rig.client.post("/v1/chat/completions", json=ask())
    again = await rig.client.post("/v1/chat/completions", json=ask())
    assert first.status_code == again.status_code == 200, again.text
    assert (first.headers["x-lamina-cache"], again.headers["x-lamina-cache"]) == ("miss", "hit")
    assert again.json()["citations"] == first.json()["citations"]  # the hit cites what this request retrieved
    assert len(rig.dispatcher.sent) == 1
    v1 = first.json()["citations"][0]["dataset_version"]

    (rig.root / "drums.md").write_text("A drum kit has a snare, a bass drum, toms and cymbals.\n")
    v2 = rig.ingest()
    assert v2 and v2 != v1
    after = await rig.client.post("/v1/chat/completions", json=ask())
    assert after.headers["x-lamina-cache"] == "miss", "an answer grounded in the old version was served"
    assert after.json()["citations"][0]["dataset_version"] == v2
    assert len(rig.dispatcher.sent) == 2
    # the replica got the very same request both times: only the version tells the answers apart
    assert rig.dispatcher.sent[0].body == rig.dispatcher.sent[1].body

    repeat = await rig.client.post("/v1/chat/completions", json=ask())
    pinned = await rig.client.post("/v1/chat/completions", json=ask("docs@1"))
    assert (repeat.headers["x-lamina-cache"], pinned.headers["x-lamina-cache"]) == ("hit", "hit")
    assert pinned.json()["citations"][0]["dataset_version"] == v1  # the old version, asked for by name
    assert len(rig.dispatcher.sent) == 2
