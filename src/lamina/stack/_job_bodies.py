"""The built-in job kinds' entrypoints (``lamina.stack._job_bodies:<function>``), each run in its own job
process: from the job's context (the state directory and the config, as JSON) it opens the layers it
needs, as the CLI does. What each kind does: :mod:`lamina.stack._jobs`, which registers them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from lamina.config import LaminaConfig
from lamina.errors import InvalidRequestError
from lamina.orchestration import JobContext


def _stack(job: JobContext, model: str | None) -> Any:
    """The data stack of the job's state directory, with ``model`` as its embedding model."""
    from lamina.stack._data import open_data_stack

    config = LaminaConfig.model_validate_json(job.context["config"])
    if model:
        config = config.model_copy(update={"data": config.data.model_copy(update={"embedding_model": model})})
    return open_data_stack(config, Path(job.context["state_dir"]))


class _IngestProgress:
    def __init__(self, job: JobContext) -> None:
        self._job = job

    def files(self, done: int, total: int) -> None:
        self._job.progress(0.2 * done / max(total, 1), f"read {done} of {total} files")

    def chunks(self, done: int, total: int) -> None:
        self._job.progress(0.2 + 0.8 * done / max(total, 1), f"embedded {done} of {total} chunks")


def _source_path(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def run_embed(args: dict[str, Any], job: JobContext) -> dict[str, Any]:
    """Embed dataset version ``dataset`` with ``model`` (default: data.embedding_model) into a new version
    of ``target`` (default: the same dataset)."""
    from lamina.data import IngestOptions

    data = _stack(job, args.get("model"))
    try:
        version = data.catalog.resolve(str(args["dataset"]))
        target = str(args.get("target") or version.dataset)
        model = data.embedding_model_ref()
        job.read("dataset", version.ref, version_id=version.version_id)
        job.read("model", model)
        sources = data.catalog.sources(version)
        paths = [_source_path(s.uri) for s in sources]
        gone = [str(p) for p in paths if not p.is_file()]
        if gone:
            raise InvalidRequestError(
                f"{len(gone)} source files of {version.ref} are gone (first: {gone[0]}); ingest the "
                "dataset again from where its files are now"
            )
        job.progress(0.0, f"embedding {version.ref} ({len(paths)} files) with {model}")
        options = IngestOptions.from_config(data.config.data)
        report = data.pipeline().ingest([str(p) for p in paths], target, options, _IngestProgress(job))
        made = report.version
        if made is not None:
            job.produced("dataset", made.ref, version_id=made.version_id)
        return {
            "source": version.ref,
            "model": model,
            "version": None if made is None else made.ref,
            "state": report.state,
            "counts": report.counts,
        }
    finally:
        data.close()


def _labelled(path: Path) -> list[tuple[str, set[str]]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append((str(row["query"]), {str(r) for r in row["relevant"]}))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequestError(
                f'{path}:{n}: not a labelled query ({exc}); write {{"query": ..., "relevant": [...]}}'
            ) from exc
    if not out:
        raise InvalidRequestError(f"{path} holds no labelled queries")
    return out


def _ndcg(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    dcg = sum(1.0 / math.log2(i + 2) for i, doc in enumerate(ranked[:k]) if doc in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal if ideal else 0.0


def run_eval(args: dict[str, Any], job: JobContext) -> dict[str, Any]:
    """nDCG@k and recall@k (k: ``k``, default 10) of ``model`` ranking the documents (source files) of
    dataset version ``dataset`` for the labelled ``queries``."""
    k = int(args.get("k", 10))
    data = _stack(job, args.get("model"))
    try:
        version = data.catalog.resolve(str(args["dataset"]))
        embedder, model = data.embedder(), data.embedding_model_ref()
        job.read("dataset", version.ref, version_id=version.version_id)
        job.read("model", model)
        queries = _labelled(Path(str(args["queries"])))
        chunks = data.vectors.get(version.dataset, data.catalog.members(version))
        docs = [_source_path(c.source_uri).name for c in chunks]
        vectors: list[list[float]] = []
        batch = 64
        for start in range(0, len(chunks), batch):
            vectors += embedder.embed([c.text for c in chunks[start : start + batch]])
            job.progress(0.9 * (start + batch) / max(len(chunks), 1), f"embedded {len(vectors)} chunks")
        passages = np.asarray(vectors, dtype=np.float64)
        asked = np.asarray(embedder.embed([q for q, _ in queries]), dtype=np.float64)
        ndcg = recall = 0.0
        for row, (_, relevant) in zip(asked @ passages.T, queries, strict=True):
            ranked: list[str] = []
            for i in np.argsort(-row, kind="stable"):
                if docs[i] not in ranked:
                    ranked.append(docs[i])
                if len(ranked) == k:
                    break
            ndcg += _ndcg(ranked, relevant, k)
            recall += len(relevant & set(ranked)) / len(relevant)
        n = len(queries)
        return {
            "dataset": version.ref,
            "model": model,
            "queries": n,
            "chunks": len(chunks),
            f"ndcg@{k}": round(ndcg / n, 4),
            f"recall@{k}": round(recall / n, 4),
        }
    finally:
        data.close()


def run_quantize(args: dict[str, Any], job: JobContext) -> dict[str, Any]:
    """Quantize registered ``model`` with ``method`` behind the accuracy gate, measured on a sample of
    dataset version ``dataset``'s chunks if given (else the gate's held texts); ``tolerance.NAME=...``
    arguments set its limits. The variant is registered, servable only if it passes."""
    from lamina.models import dataset_sample, quantize_and_gate

    data = _stack(job, None)
    try:
        config = LaminaConfig.model_validate_json(job.context["config"])
        overrides = {
            k.removeprefix("tolerance."): float(v) for k, v in args.items() if k.startswith("tolerance.")
        }
        tolerance = {**config.quantization.tolerance.model_dump(), **overrides}  # as `lamina models quantize`
        ref, method = str(args["model"]), str(args["method"])
        dataset, texts = None, None
        if args.get("dataset"):
            dataset, texts = dataset_sample(data.catalog, data.vectors, str(args["dataset"]))
            job.read("dataset", dataset)
        job.read("model", data.registry.get(ref).ref)
        job.progress(0.1, f"quantizing {ref} with {method}")
        result = quantize_and_gate(data.registry, ref, method, tolerance, texts=texts, dataset=dataset)
        job.produced("model", result.ref, passed=result.passed)
        return dict(result.to_json())
    finally:
        data.close()


def run_train(args: dict[str, Any], job: JobContext) -> dict[str, Any]:
    """Fine-tune the embedding model on dataset version ``dataset``'s ``queries`` (see
    :mod:`lamina.stack._train` for the arguments); registered behind the accuracy gate."""
    from lamina.stack._train import train

    data = _stack(job, None)
    try:
        return train(data, args, job)
    finally:
        data.close()
