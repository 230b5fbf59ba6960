"""From a folder to a cited answer to a drift report, through the real CLI and a real `lamina up`.

`lamina data ingest` (no stack running, in-process embedder), then the stack serves SmolLM2 with RAG over
that dataset version: the official client asks with the `rag` extension field and with a RAG alias, gets
citations back, the trace records them, the queries are sampled into the drift window, and
`lamina data drift` reports on them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from lamina.data import DriftWindow
from lamina.observability import SpanRow, read_trace
from lamina.store import Store
from tests.support import RunningStack, start_stack, stop_stack

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
DOCS = {
    "bread.md": "Sourdough bread rises slowly because wild yeast ferments the dough overnight.",
    "tea.md": "Green tea should steep for two minutes in water just below boiling.",
    "drums.md": "A drum kit has a snare, a bass drum, toms and cymbals played with sticks.",
}
CONFIG = """
deployments:
  - {name: smollm2-135m-instruct, engine: gguf, gguf: {n_ctx: 2048}}
  - {name: minilm-l6-v2, engine: onnx}
rag:
  - {name: kitchen-assistant, model: smollm2-135m-instruct, dataset: docs@1, k: 2}
"""


def lamina(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lamina.cli", *args, "--state-dir", str(state)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    tmp = tmp_path_factory.mktemp("rag")
    (tmp / "docs").mkdir()
    for name, text in DOCS.items():
        (tmp / "docs" / name).write_text(text + "\n")
    ingest = lamina(tmp / "state", "data", "ingest", str(tmp / "docs"), "--dataset", "docs", "--json")
    assert ingest.returncode == 0, ingest.stderr
    running = start_stack(tmp, CONFIG)
    yield running
    assert stop_stack(running) == []


@pytest.fixture(scope="module")
def client(stack: RunningStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="k", max_retries=0)


def test_a_grounded_answer_cites_the_version_and_the_trace_records_it(
    stack: RunningStack, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT,
        messages=[{"role": "user", "content": "How long should green tea steep?"}],
        max_tokens=24,
        temperature=0,
        extra_body={"rag": {"dataset": "docs@1", "k": 2}},
    )
    reply = raw.parse()
    assert reply.choices[0].message.content
    citations: list[dict[str, Any]] = reply.model_extra["citations"]  # type: ignore[index]
    assert citations[0]["source_uri"].endswith("/docs/tea.md")
    assert citations[0]["dataset_seq"] == 1
    assert (citations[0]["byte_start"], citations[0]["byte_end"]) == (0, len(DOCS["tea.md"]))

    store = Store(f"sqlite:///{stack.state_dir / 'lamina.db'}")
    trace_id, spans = raw.headers["x-lamina-trace-id"], list[SpanRow]()
    deadline = time.monotonic() + 20
    layers = {"application", "data", "models", "orchestration"}
    while time.monotonic() < deadline and not layers <= {s["layer"] for s in spans}:
        time.sleep(0.5)
        spans = read_trace(store, trace_id)
    retrieve = next(s for s in spans if s["name"] == "retrieve")
    assert retrieve["layer"] == "data"
    assert retrieve["attributes"]["lamina.retrieval.chunk_ids"] == [c["chunk_id"] for c in citations]
    assert layers <= {s["layer"] for s in spans}
    store.close()


def test_a_rag_alias_and_a_stream_carry_citations(stack: RunningStack) -> None:
    body = {
        "model": "kitchen-assistant",
        "messages": [{"role": "user", "content": "Why does sourdough rise slowly?"}],
        "max_tokens": 16,
        "stream": True,
    }
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    trailer = json.loads(events[-2])
    assert trailer["object"] == "lamina.citations"
    assert trailer["citations"][0]["source_uri"].endswith("/docs/bread.md")


def test_retrieve_endpoint_and_cli_search_agree(stack: RunningStack) -> None:
    r = httpx.post(
        f"{stack.base_url}/v1/retrieve",
        json={"dataset": "docs", "query": "cymbals and a snare", "k": 3, "mode": "hybrid"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    api_ids = [c["chunk_id"] for c in r.json()["data"]]
    cli = lamina(stack.state_dir, "data", "search", "docs", "cymbals and a snare", "-k", "3", "--json")
    assert cli.returncode == 0, cli.stderr
    assert [c["chunk_id"] for c in json.loads(cli.stdout)["data"]] == api_ids
    assert r.json()["data"][0]["source_uri"].endswith("/docs/drums.md")


def test_ingest_through_the_gateway_embeds_with_the_served_model(stack: RunningStack, tmp_path: Path) -> None:
    """``lamina data ingest --gateway``: the CLI embeds through the running stack's replica, and the
    gateway then finds those chunks by meaning (its query vectors live in the same space)."""
    (tmp_path / "garden").mkdir()
    (tmp_path / "garden" / "roses.md").write_text("Prune roses in late winter, just above an outward bud.\n")
    (tmp_path / "garden" / "tomatoes.md").write_text("Tomato seedlings need sixteen hours of light a day.\n")
    before = httpx.get(f"{stack.base_url}/metrics", timeout=30).text
    ingest = lamina(
        stack.state_dir,
        "data",
        "ingest",
        str(tmp_path / "garden"),
        "--dataset",
        "garden",
        "--gateway",
        f"{stack.base_url}/v1",
        "--json",
    )
    assert ingest.returncode == 0, ingest.stderr
    assert json.loads(ingest.stdout)["counts"]["chunks_embedded"] == 2
    after = httpx.get(f"{stack.base_url}/metrics", timeout=30).text
    assert _embedding_requests(after) > _embedding_requests(before)  # the replica embedded them
    r = httpx.post(
        f"{stack.base_url}/v1/retrieve",
        json={
            "dataset": "garden",
            "query": "when should I cut back my rose bushes",
            "k": 1,
            "mode": "vector",
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["source_uri"].endswith("/garden/roses.md")


def _embedding_requests(metrics: str) -> float:
    """Requests the gateway served on /v1/embeddings, from its Prometheus text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("lamina_requests_total{") and "embeddings" in line
    )


def test_queries_feed_the_drift_window_and_drift_reports_on_them(stack: RunningStack) -> None:
    questions = [f"question {i} about brewing green tea and baking bread" for i in range(35)]
    for q in questions:
        r = httpx.post(f"{stack.base_url}/v1/retrieve", json={"dataset": "docs", "query": q}, timeout=60)
        assert r.status_code == 200
    store = Store(f"sqlite:///{stack.state_dir / 'lamina.db'}")
    window = DriftWindow(store)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and window.count("docs") < 35:
        time.sleep(0.3)
    assert window.count("docs") >= 35
    store.close()
    drift = lamina(stack.state_dir, "data", "drift", "docs", "--window", "1h", "--json")
    assert drift.returncode == 0, drift.stderr
    report = json.loads(drift.stdout)
    assert report["dataset"] == "docs"
    # three reference chunks are too few to judge, and the report says so instead of guessing
    assert report["verdict"] == "insufficient_data"
    assert report["explanation"]


def test_unknown_dataset_is_a_clear_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "hi"}], extra_body={"rag": {"dataset": "nope"}}
        )
    assert "nope" in str(info.value)


def test_admin_ingest_is_off_until_roots_are_configured(stack: RunningStack) -> None:
    r = httpx.post(f"{stack.base_url}/admin/v1/datasets/docs/ingest", json={"paths": ["*.md"]}, timeout=30)
    assert r.status_code == 403
    assert "data.ingest_roots" in r.json()["error"]["message"]
    listed = httpx.get(f"{stack.base_url}/admin/v1/datasets", timeout=30)
    assert listed.status_code == 200
    assert "docs" in listed.text
