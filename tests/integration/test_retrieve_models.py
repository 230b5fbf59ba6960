"""Queries of a dataset version are embedded with the model that embedded the version.

Real pieces: the ingest pipeline into a SQLite dataset catalog and LanceDB, the Retriever over them; the
hashing embedder stands for the model that embedded the version (``hashing-embedder@1``) while the
gateway's own query model is another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from lamina.data import AsyncEmbedder, LanceDBStore, Retriever
from lamina.data.ingest import IngestOptions, IngestPipeline, LineageEmitter
from lamina.data.versions import DatasetCatalog
from lamina.errors import ConflictError
from lamina.store import Store
from tests.support import HashingEmbedder

pytestmark = pytest.mark.anyio


class Queries:
    def __init__(self, embedder: HashingEmbedder) -> None:
        self.embedder, self.calls = embedder, 0

    async def embed_queries(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls += 1
        return self.embedder.embed(texts)


class Refuse:
    async def embed_queries(self, texts: Sequence[str]) -> list[list[float]]:
        raise AssertionError("the gateway's own query model must not embed this version's queries")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[DatasetCatalog, LanceDBStore]:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "tea.md").write_text("Green tea should steep for two minutes in water just below boiling.\n")
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    catalog, vectors = DatasetCatalog(store), LanceDBStore(tmp_path / "vectors")
    pipeline = IngestPipeline(catalog, vectors, HashingEmbedder(), LineageEmitter(tmp_path / "lineage.jsonl"))
    pipeline.ingest([str(root)], "docs", IngestOptions(chunk_size=48, chunk_overlap=8))
    return catalog, vectors


async def test_a_version_embedded_with_another_model_is_searched_with_that_model(
    setup: tuple[DatasetCatalog, LanceDBStore],
) -> None:
    catalog, vectors = setup
    own = Queries(HashingEmbedder())
    asked: list[str] = []

    def embedder_for(model: str) -> AsyncEmbedder | None:
        asked.append(model)
        return own if model == HashingEmbedder.name else None

    retriever = Retriever(catalog, vectors, Refuse(), "minilm-l6-v2@2", embedder_for)
    found = await retriever.retrieve("docs", "how long does green tea steep", k=1, mode="vector")
    assert found.citations and "tea.md" in found.citations[0].source_uri
    assert asked == [HashingEmbedder.name] and own.calls == 1


async def test_with_no_embedder_for_its_model_vector_search_is_refused_keyword_search_is_not(
    setup: tuple[DatasetCatalog, LanceDBStore],
) -> None:
    catalog, vectors = setup
    for embedder_for in (None, lambda _model: None):
        retriever = Retriever(catalog, vectors, Refuse(), "minilm-l6-v2@2", embedder_for)
        with pytest.raises(ConflictError) as refused:
            await retriever.retrieve("docs", "green tea", mode="hybrid")
        assert f"embedded with {HashingEmbedder.name}" in refused.value.message
        assert "mode=keyword" in refused.value.message
        found = await retriever.retrieve("docs", "green tea", mode="keyword")
        assert found.citations
