"""Concurrent embedding requests to one real replica worker process of the bundled MiniLM are batched
together, and each still gets exactly its own vectors and usage; a bad request fails only itself."""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support import free_port, minilm_spec

pytestmark = pytest.mark.slow

MODEL = "minilm"
#: one forward pass over many padded texts is not bit-identical to one over a text alone
ATOL = 1e-4
#: keeps the engine busy for a second or so (33 texts of ~180 tokens: more than a batch takes, so it goes
#: alone); the burst sent behind it arrives while the engine is busy and is gathered into batches
LONG = {"model": MODEL, "input": [f"word{i} " * 60 for i in range(33)]}
TEXTS = [
    ["A man is eating food."],
    ["A man is eating a piece of bread.", "The girl is carrying a baby."],
    ["A man is riding a horse."],
    ["A woman is playing violin.", "Two men pushed carts through the woods.", "A monkey is playing drums."],
    ["A man is riding a white horse on an enclosed ground."],
    [" "],  # no words: only the special tokens
]


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def post(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/embeddings", json=body, timeout=120)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One replica worker process of the bundled MiniLM, ready."""
    directory = tmp_path_factory.mktemp("minilm")
    load = minilm_spec()
    spec = {
        "served_name": MODEL,
        "engine": "onnx",
        "path": str(load.path),
        "extra_files": {role: str(p) for role, p in load.extra_files.items()},
    }
    (directory / "spec.json").write_text(json.dumps(spec))
    port, log_path = free_port(), directory / "worker.log"
    cmd = [sys.executable, "-m", "lamina.models._worker", "--port", str(port), "--no-secret"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--spec", str(directory / "spec.json")], stdout=log, stderr=subprocess.STDOUT
        )
    running = Worker(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_ready(running)
        yield running
    finally:
        proc.kill()
        proc.wait(timeout=30)


def wait_ready(worker: Worker, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{worker.log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{worker.url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"worker not ready:\n{worker.log_path.read_text(errors='replace')}")


def burst(worker: Worker, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """A long request, then ``bodies`` sent at once from threads of their own while it runs."""
    gate = threading.Barrier(len(bodies) + 1)

    def send(body: dict[str, Any]) -> httpx.Response:
        with httpx.Client(timeout=120) as client:
            gate.wait()
            return client.post(f"{worker.url}/v1/embeddings", json=body)

    with cf.ThreadPoolExecutor(max_workers=len(bodies) + 1) as pool:
        long = pool.submit(worker.post, LONG)
        sent = [pool.submit(send, b) for b in bodies]
        gate.wait()
        replies = [f.result() for f in sent]
        assert long.result().status_code == 200
    return replies


def test_concurrent_requests_get_their_own_vectors_and_usage(worker: Worker) -> None:
    alone = [worker.post({"model": MODEL, "input": texts}).json() for texts in TEXTS]
    replies = burst(worker, [{"model": MODEL, "input": texts} for texts in TEXTS])
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    bodies = [r.json() for r in replies]
    for texts, own, single in zip(TEXTS, bodies, alone, strict=True):
        assert [d["index"] for d in own["data"]] == list(range(len(texts)))
        got = np.array([d["embedding"] for d in own["data"]])
        expected = np.array([d["embedding"] for d in single["data"]])
        assert got.shape == (len(texts), 384)
        assert np.allclose(got, expected, atol=ATOL), np.abs(got - expected).max()
        assert own["usage"] == single["usage"]
        assert own["usage"]["prompt_tokens"] > 0
    assert max(b["lamina"]["batch_requests"] for b in bodies) > 1, [b["lamina"] for b in bodies]
    assert sum(b["lamina"]["batch_texts"] for b in bodies) > sum(len(t) for t in TEXTS)


def test_a_bad_request_does_not_fail_its_batch_mates(worker: Worker) -> None:
    good = [{"model": MODEL, "input": texts} for texts in TEXTS[:3]]
    bad: list[dict[str, Any]] = [
        {"model": MODEL, "input": []},
        {"model": MODEL, "input": [1, 2]},
        {"model": MODEL, "input": "x", "dimensions": 8},
        {"model": MODEL, "input": "x", "encoding_format": "hex"},
    ]
    replies = burst(worker, [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3]])
    statuses = [r.status_code for r in replies]
    assert statuses == [200, 400, 200, 400, 400, 200, 400], [r.text for r in replies]
    ok = [replies[i].json() for i in (0, 2, 5)]
    for body, texts in zip(ok, TEXTS[:3], strict=True):
        alone = worker.post({"model": MODEL, "input": texts}).json()
        got = np.array([d["embedding"] for d in body["data"]])
        assert np.allclose(got, [d["embedding"] for d in alone["data"]], atol=ATOL)
        assert body["usage"] == alone["usage"]
    assert [replies[i].json()["error"]["param"] for i in (1, 3, 4, 6)] == [
        "input",
        "input",
        "dimensions",
        "encoding_format",
    ]
