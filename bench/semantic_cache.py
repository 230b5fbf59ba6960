"""The semantic cache's threshold: false hits on hard negatives and hits on true paraphrases.

Data: PAWS-Wiki dev (/work/shared/data/paraphrase/paws-wiki/dev.tsv): sentence pairs labelled paraphrase
(1) or not (0); the negatives are the same words in another order, the hardest case for a cache that
matches by embedding. Both sentences of each pair are embedded with the bundled MiniLM (int8 ONNX), the
model the gateway embeds queries with by default.

1. Pairwise: the cosine similarity of each pair. For each threshold, the false-hit rate (negatives at or
   above it) and the hit rate (paraphrases at or above it); the chosen threshold is the lowest whose
   false-hit rate is at most ``--max-false-hits`` (1%).
2. End to end at that threshold: the first sentence of ``--e2e`` pairs goes through the gateway's
   SemanticIndex (LanceDB in a temporary directory, one scope), then each second sentence probes it: a
   paraphrase's hit on its own pair counts as a hit, a negative's as a false hit; a hit on another pair's
   entry (another request's answer) is counted apart, split into hits on the very same text (PAWS repeats
   sentences across pairs: rightly a hit) and on another text (a wrong answer served).

    .venv/bin/python bench/semantic_cache.py [--pairs 8000] [--e2e 400]

Prints both figures and writes bench/results/semantic_cache-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import minilm_spec

from lamina.application._cache_semantic import SemanticIndex
from lamina.data import LanceDBStore
from lamina.models import load_engine

DATA = Path("/work/shared/data/paraphrase/paws-wiki/dev.tsv")
RESULTS = Path(__file__).resolve().parent / "results"


def load_pairs(limit: int) -> list[tuple[str, str, int]]:
    with DATA.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["sentence1"], r["sentence2"], int(r["label"])) for r in rows[:limit]]


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit vectors of ``texts``, kept in bench/results by a hash of the texts (reruns skip the model)."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    kept = RESULTS / f"semantic_cache_vectors_{digest}.npy"
    if kept.is_file():
        loaded: np.ndarray = np.load(kept)
        return loaded
    engine = load_engine("onnx", minilm_spec())
    out = []
    for start in range(0, len(texts), 256):
        out.extend(engine.embed(list(texts[start : start + 256])).vectors)
    vectors = np.asarray(out, dtype=np.float64)
    unit: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    RESULTS.mkdir(exist_ok=True)
    np.save(kept, unit.astype(np.float32))
    return unit


def sweep(sims: np.ndarray, labels: np.ndarray) -> list[dict[str, float]]:
    neg, pos = sims[labels == 0], sims[labels == 1]
    rows = []
    grid = np.concatenate([np.arange(0.80, 0.99, 0.0025), np.arange(0.99, 1.0, 0.0002), [0.9999, 1.0]])
    for t in np.unique(np.round(grid, 4)):
        rows.append(
            {"threshold": float(t), "false_hits": float((neg >= t).mean()), "hits": float((pos >= t).mean())}
        )
    return rows


class Precomputed:
    """The AsyncEmbedder port on vectors already computed (the bench measures the index, not the model)."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table

    async def embed_queries(self, texts: Sequence[str]) -> list[list[float]]:
        return [self.table[t].tolist() for t in texts]


async def end_to_end(
    pairs: list[tuple[str, str, int]], table: dict[str, np.ndarray], threshold: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        store = LanceDBStore(Path(tmp))
        index = SemanticIndex(store, Precomputed(table), min_similarity=threshold, max_entries=len(pairs) + 1)
        for i, (first, _, _) in enumerate(pairs):
            probe = await index.probe("scope", first)
            assert probe is not None
            await index.add(probe, f"pair-{i}")
        hits = false_hits = wrong = same_text = positives = negatives = 0
        started = time.perf_counter()
        for i, (_, second, label) in enumerate(pairs):
            probe = await index.probe("scope", second)
            assert probe is not None
            own = probe.key == f"pair-{i}"
            if probe.key is not None and not own:  # another request's answer
                other = pairs[int(probe.key.removeprefix("pair-"))][0]
                wrong += other != second
                same_text += other == second  # PAWS reuses sentences: the very same text, rightly a hit
            if label == 1:
                positives += 1
                hits += own
            else:
                negatives += 1
                false_hits += own
        probe_ms = (time.perf_counter() - started) * 1000 / len(pairs)
        store.close()
    return {
        "pairs": len(pairs),
        "paraphrases": positives,
        "hard_negatives": negatives,
        "hit_rate": hits / max(1, positives),
        "false_hit_rate": false_hits / max(1, negatives),
        "other_entry_hits": wrong,
        "other_entry_same_text_hits": same_text,
        "probe_ms_mean": round(probe_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8000, help="PAWS dev pairs for the threshold sweep")
    parser.add_argument("--e2e", type=int, default=400, help="pairs run through the SemanticIndex")
    parser.add_argument("--max-false-hits", type=float, default=0.01)
    args = parser.parse_args()

    pairs = load_pairs(args.pairs)
    texts = list(dict.fromkeys(t for a, b, _ in pairs for t in (a, b)))
    started = time.perf_counter()
    vectors = embed(texts)
    embed_s = time.perf_counter() - started
    table = dict(zip(texts, vectors, strict=True))
    sims = np.array([float(table[a] @ table[b]) for a, b, _ in pairs])
    labels = np.array([label for _, _, label in pairs])
    rows = sweep(sims, labels)
    chosen = next(r for r in rows if r["false_hits"] <= args.max_false_hits)  # 1.0: identical embeddings
    e2e = asyncio.run(end_to_end(pairs[: args.e2e], table, chosen["threshold"]))
    result = {
        "data": str(DATA),
        "pairs": len(pairs),
        "paraphrases": int((labels == 1).sum()),
        "hard_negatives": int((labels == 0).sum()),
        "model": "all-MiniLM-L6-v2 int8 ONNX (bundled)",
        "embed_s": round(embed_s, 1),
        "similarity_mean": {
            "paraphrase": float(sims[labels == 1].mean()),
            "negative": float(sims[labels == 0].mean()),
        },
        "max_false_hits": args.max_false_hits,
        "threshold": chosen["threshold"],
        "false_hit_rate": chosen["false_hits"],
        "hit_rate": chosen["hits"],
        "end_to_end": e2e,
        "sweep": rows,
    }
    counts = f"{result['paraphrases']} paraphrases, {result['hard_negatives']} hard negatives"
    print(f"pairs: {len(pairs)} ({counts})")
    for r in rows[::10]:
        print(f"  threshold {r['threshold']:.4f}: false hits {r['false_hits']:.2%}, hits {r['hits']:.2%}")
    print(
        f"chosen threshold {chosen['threshold']:.4f}: false hits {chosen['false_hits']:.2%} of hard "
        f"negatives, hits {chosen['hits']:.2%} of paraphrases"
    )
    print(
        f"end to end ({e2e['pairs']} pairs through SemanticIndex on LanceDB): false hits "
        f"{e2e['false_hit_rate']:.2%}, hits {e2e['hit_rate']:.2%}; hits on another pair's entry: "
        f"{e2e['other_entry_same_text_hits']} with the same text, {e2e['other_entry_hits']} with another; "
        f"{e2e['probe_ms_mean']} ms per probe"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"semantic_cache-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
