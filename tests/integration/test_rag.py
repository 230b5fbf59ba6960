"""Retrieval and RAG in the gateway: answers cite the exact dataset version and source bytes they used.

A real Retriever over a real vector store (each test runs on LanceDB and on pgvector) with real MiniLM
vectors; the replica is the gateway tests' ReplayDispatcher (the end-to-end path with a real worker is
covered by the e2e tests).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from lamina.application import GatewayDeps, RagOptions, create_app
from lamina.data import Chunk, LanceDBStore, PinnedVersion, Retrieval, Retriever
from lamina.errors import ConflictError, NotFoundError
from lamina.models import Engine, load_engine
from lamina.observability import Telemetry, read_trace
from lamina.store import Store
from tests.support import CHAT, ReplayDispatcher, StaticCatalog, VectorBackend, events_of, minilm_spec

pytestmark = pytest.mark.anyio

DOCS = {
    "bread.md": "Sourdough bread rises slowly because wild yeast ferments the dough overnight.",
    "drums.md": "A drum kit has a snare, a bass drum, toms and cymbals played with sticks.",
    "tea.md": "Green tea should steep for two minutes in water just below boiling.",
    "rust.md": "Rust's borrow checker enforces that references never outlive their data.",
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load_engine("onnx", minilm_spec())


class EngineQueries:
    """The AsyncEmbedder port on the real engine, in-process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def embed_queries(self, texts: Sequence[str]) -> list[list[float]]:
        return self.engine.embed(texts).vectors


@dataclass
class Versions:
    """The VersionResolver port over a fixed set of versions: v1 holds every doc, v2 all but drums."""

    ids: dict[str, str]
    pinned: list[str] = field(default_factory=list)

    def pin(self, ref: str) -> PinnedVersion:
        self.pinned.append(ref)
        name, _, version = ref.partition("@")
        if name != "docs" or version not in ("", "1", "2", "prod"):
            raise NotFoundError(f"no dataset version {ref!r}; `lamina data list` shows them")
        keep = {cid for src, cid in self.ids.items() if version not in ("2", "prod") or src != "drums.md"}
        seq = 1 if version == "1" else 2
        return PinnedVersion("docs", f"version{seq}", seq, frozenset(keep))


@dataclass
class Sink:
    seen: list[Retrieval] = field(default_factory=list)

    def record(self, retrieval: Retrieval) -> None:
        self.seen.append(retrieval)


@dataclass
class Rig:
    client: httpx.AsyncClient
    dispatcher: ReplayDispatcher
    versions: Versions
    sink: Sink
    telemetry: Telemetry
    store: Store


@pytest.fixture
async def rig(vstore: VectorBackend, tmp_path: Path, engine: Engine) -> AsyncIterator[Rig]:
    vectors = vstore
    texts = list(DOCS.values())
    embedded = engine.embed(texts).vectors
    chunks, ids = [], {}
    for (src, text), vector in zip(DOCS.items(), embedded, strict=True):
        digest = hashlib.sha256(text.encode()).hexdigest()
        ids[src] = digest[:32]
        chunks.append(
            Chunk(
                chunk_id=digest[:32],
                dataset="docs",
                version="version1",
                text=text,
                source_uri=f"file:///corpus/{src}",
                byte_start=0,
                byte_end=len(text),
                content_sha256=digest,
                metadata={"kind": "note"},
                vector=vector,
            )
        )
    vectors.upsert("docs", chunks)
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    telemetry = Telemetry(service_name="rag-test", store=store, otlp_endpoint=None)
    versions, sink, dispatcher = Versions(ids), Sink(), ReplayDispatcher()
    deps = GatewayDeps(
        StaticCatalog(),
        dispatcher,
        lambda: {},
        telemetry,
        retriever=Retriever(versions, vectors, EngineQueries(engine)),
        rag_aliases={"docs-assistant": (CHAT, RagOptions(dataset="docs@prod", k=2))},
        query_sink=sink,
    )
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield Rig(client, dispatcher, versions, sink, telemetry, store)
    telemetry.shutdown()
    store.close()


def ask(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": CHAT, "messages": [{"role": "user", "content": question}], **extra}


async def test_retrieve_cites_the_version_and_source_bytes(rig: Rig) -> None:
    r = await rig.client.post(
        "/v1/retrieve", json={"dataset": "docs@1", "query": "how long to brew tea", "k": 2, "mode": "vector"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dataset"] == "docs" and body["dataset_version"] == "version1" and body["dataset_seq"] == 1
    top = body["data"][0]
    assert top["source_uri"] == "file:///corpus/tea.md"
    assert (top["byte_start"], top["byte_end"]) == (0, len(DOCS["tea.md"]))
    assert top["content_sha256"] == hashlib.sha256(DOCS["tea.md"].encode()).hexdigest()
    assert [c["index"] for c in body["data"]] == [1, 2]


@pytest.mark.parametrize("mode", ["vector", "keyword", "hybrid"])
async def test_a_pinned_version_only_returns_its_own_chunks(rig: Rig, mode: str) -> None:
    query = {"query": "snare drum and cymbals", "k": 4, "mode": mode}
    old = (await rig.client.post("/v1/retrieve", json={"dataset": "docs@1", **query})).json()
    new = (await rig.client.post("/v1/retrieve", json={"dataset": "docs@2", **query})).json()
    assert old["data"][0]["source_uri"] == "file:///corpus/drums.md"
    assert "file:///corpus/drums.md" not in {c["source_uri"] for c in new["data"]}


async def test_grounded_chat_puts_passages_in_context_and_cites_them(rig: Rig) -> None:
    rag = {"dataset": "docs@1", "k": 2, "mode": "hybrid"}
    r = await rig.client.post("/v1/chat/completions", json=ask("Why does sourdough rise slowly?", rag=rag))
    assert r.status_code == 200, r.text
    sent = rig.dispatcher.sent[-1].body
    assert "rag" not in sent
    assert sent["messages"][0]["role"] == "system"
    assert DOCS["bread.md"] in sent["messages"][0]["content"]
    assert sent["messages"][-1] == {"role": "user", "content": "Why does sourdough rise slowly?"}
    citations = r.json()["citations"]
    assert citations[0]["source_uri"] == "file:///corpus/bread.md"
    assert citations[0]["dataset_version"] == "version1"
    assert rig.sink.seen and rig.sink.seen[-1].version.seq == 1

    rig.telemetry.force_flush()
    spans = read_trace(rig.store, r.headers["x-lamina-trace-id"])
    retrieve = next(s for s in spans if s["name"] == "retrieve")
    assert retrieve["layer"] == "data"
    assert retrieve["attributes"]["lamina.dataset.version"] == "version1"
    assert retrieve["attributes"]["lamina.retrieval.chunk_ids"] == [c["chunk_id"] for c in citations]


async def test_a_streamed_grounded_answer_sends_citations_before_done(rig: Rig) -> None:
    body = ask("What is in a drum kit?", rag={"dataset": "docs", "k": 1}, stream=True)
    r = await rig.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    events = events_of(r.text)
    assert events[-1] == "[DONE]"
    trailer = json.loads(events[-2])
    assert trailer["object"] == "lamina.citations"
    assert trailer["citations"][0]["chunk_id"]
    assert all("lamina.citations" not in e for e in events[:-2])


async def test_a_rag_alias_answers_with_its_model_and_dataset(rig: Rig) -> None:
    r = await rig.client.post("/v1/chat/completions", json={**ask("tea?"), "model": "docs-assistant"})
    assert r.status_code == 200, r.text
    assert rig.dispatcher.sent[-1].body["model"] == CHAT
    assert rig.versions.pinned[-1] == "docs@prod"
    assert len(r.json()["citations"]) == 2


@pytest.mark.parametrize(
    ("rag", "param"),
    [
        ({"dataset": "docs", "k": 0}, "rag.k"),
        ({"k": 2}, "rag.dataset"),
        ({"dataset": "docs", "x": 1}, "rag.x"),
    ],
)
async def test_a_bad_rag_field_is_400_naming_it(rig: Rig, rag: dict[str, Any], param: str) -> None:
    r = await rig.client.post("/v1/chat/completions", json=ask("hi", rag=rag))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert rig.dispatcher.sent == []


async def test_an_unknown_dataset_is_404_and_nothing_is_generated(rig: Rig) -> None:
    r = await rig.client.post("/v1/chat/completions", json=ask("hi", rag={"dataset": "nope@3"}))
    assert r.status_code == 404
    assert "lamina data list" in r.json()["error"]["message"]
    assert rig.dispatcher.sent == []


async def test_without_a_retriever_rag_is_a_clear_400(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    telemetry = Telemetry(service_name="rag-test", store=None, otlp_endpoint=None)
    app = create_app(GatewayDeps(StaticCatalog(), ReplayDispatcher(), lambda: {}, telemetry))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        r = await client.post("/v1/retrieve", json={"dataset": "docs", "query": "x"})
    assert r.status_code == 400
    assert "lamina data ingest" in r.json()["error"]["message"]
    telemetry.shutdown()
    store.close()


async def test_a_version_embedded_by_another_model_is_refused_for_vector_search(
    tmp_path: Path, engine: Engine
) -> None:
    @dataclass
    class OtherModel:
        def pin(self, ref: str) -> PinnedVersion:
            return PinnedVersion("docs", "v9", 9, frozenset({"a"}), embedding_model="e5-small@1")

    retriever = Retriever(OtherModel(), LanceDBStore(tmp_path / "v"), EngineQueries(engine), "minilm-l6-v2@1")
    with pytest.raises(ConflictError) as info:
        await retriever.retrieve("docs@9", "tea", mode="hybrid")
    assert "e5-small@1" in info.value.message and "mode=keyword" in info.value.message
    with pytest.raises(NotFoundError):  # keyword search needs no vectors: past the check, to the empty store
        await retriever.retrieve("docs@9", "tea", mode="keyword")
