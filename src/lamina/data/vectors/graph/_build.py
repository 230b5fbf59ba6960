"""Writing a build of the graph index: afresh, or extending the published build with the table's new rows.

See ``lamina.data.vectors.graph`` for the files a build holds and how it is published.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.ipc as ipc  # type: ignore[import-untyped]

from lamina.data.vectors._text import EnglishAnalyzer
from lamina.data.vectors._types import GraphIndex
from lamina.data.vectors.graph._search import ROW_SCHEMA, Graph, faiss_module

#: An extending build starts afresh once this fraction of its rows is deleted (they cost search time).
MAX_DELETED = 0.2


def write_fresh_build(
    table: pa.Table,
    matrix: npt.NDArray[np.float32],
    params: GraphIndex,
    target: Path,
    analyzer: EnglishAnalyzer,
) -> None:
    faiss = faiss_module()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    if params.vectors == "float16":
        index = faiss.IndexHNSWSQ(
            matrix.shape[1], faiss.ScalarQuantizer.QT_fp16, params.m, faiss.METRIC_INNER_PRODUCT
        )
        index.train(matrix)  # float16 needs no statistics; FAISS asks for the call
    else:
        index = faiss.IndexHNSWFlat(matrix.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    index.add(matrix)
    vocabulary: dict[str, int] = {}
    postings = _analyze(table.column("text").to_pylist(), analyzer, vocabulary, first_row=0)
    _save(target, table, index, vocabulary, *postings)


def extend_build(
    previous: Graph, table: pa.Table, matrix: npt.NDArray[np.float32], target: Path, analyzer: EnglishAnalyzer
) -> int | None:
    """Write ``previous`` plus the table's new rows, rows gone from the table marked deleted; returns how
    many are deleted, or None (nothing written) when too many would be."""
    live_ids = previous.chunk_ids.filter(pa.array(previous.live))
    added = ~pc.is_in(table.column("chunk_id"), value_set=live_ids).to_numpy(zero_copy_only=False)
    kept = pc.is_in(previous.chunk_ids, value_set=table.column("chunk_id").combine_chunks())
    dead = ~(previous.live & kept.to_numpy(zero_copy_only=False))
    size = previous.size + int(added.sum())
    if int(dead.sum()) > MAX_DELETED * size:
        return None
    faiss = faiss_module()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = faiss.read_index(str(previous.directory / "graph.faiss"))  # a copy: the published one stays
    new_rows = table.filter(pa.array(added))
    if len(new_rows):
        index.add(np.ascontiguousarray(matrix[added]))
    vocabulary = {term: i for i, term in enumerate(previous.terms)}
    term_ids, rows, tfs, doc_len = _analyze(
        new_rows.column("text").to_pylist(), analyzer, vocabulary, first_row=previous.size
    )
    old_terms = np.repeat(np.arange(len(previous.terms), dtype=np.int64), np.diff(previous.offsets))
    merged = pa.concat_tables([pa.Table.from_batches([previous.batch]), new_rows]).combine_chunks()
    _save(
        target,
        merged,
        index,
        vocabulary,
        np.concatenate([old_terms, term_ids]),
        np.concatenate([previous.posting_rows, rows]),
        np.concatenate([previous.posting_tfs, tfs]),
        np.concatenate([previous.doc_len, doc_len]),
    )
    np.save(target / "deleted.npy", np.flatnonzero(dead))
    return int(dead.sum())


def _analyze(
    texts: list[str], analyzer: EnglishAnalyzer, vocabulary: dict[str, int], first_row: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Postings (term id, row, tf) and lengths of ``texts``, rows numbered from ``first_row``; new terms
    are added to ``vocabulary``."""
    term_ids: list[int] = []
    tfs: list[int] = []
    rows: list[int] = []
    doc_len = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        indexed = analyzer.index(text)
        doc_len[i] = indexed.length
        term_ids.extend(vocabulary.setdefault(term, len(vocabulary)) for term in indexed.terms)
        tfs.extend(indexed.tfs)
        rows.extend([first_row + i] * len(indexed.terms))
    as_array = [np.asarray(values, dtype=np.int64) for values in (term_ids, rows, tfs)]
    return as_array[0], as_array[1], as_array[2], doc_len


def _save(
    target: Path,
    table: pa.Table,
    index: Any,
    vocabulary: dict[str, int],
    term_ids: npt.NDArray[np.int64],
    rows: npt.NDArray[np.int64],
    tfs: npt.NDArray[np.int64],
    doc_len: npt.NDArray[np.int64],
) -> None:
    """Write a build: the graph, the rows, and the postings as compressed sparse rows by term."""
    order = np.argsort(term_ids, kind="stable")
    offsets = np.zeros(len(vocabulary) + 1, dtype=np.int64)
    np.cumsum(np.bincount(term_ids, minlength=len(vocabulary)), out=offsets[1:])
    np.savez(target / "keywords.npz", offsets=offsets, rows=rows[order], tfs=tfs[order], doc_len=doc_len)
    (target / "terms.json").write_text(json.dumps(list(vocabulary)), encoding="utf-8")
    with ipc.new_file(str(target / "rows.arrow"), ROW_SCHEMA) as writer:
        writer.write_batch(table.combine_chunks().to_batches()[0])
    faiss_module().write_index(index, str(target / "graph.faiss"))
