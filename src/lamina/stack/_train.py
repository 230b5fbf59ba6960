"""The ``train`` job kind: a dataset version's labelled queries become (query, passage) pairs, a held part
of them the gate's, and the models layer fine-tunes, exports, quantizes and registers
(:func:`lamina.models.train_and_gate`).

Queries are the ``eval`` kind's JSONL (``{"query": ..., "relevant": [source file name, ...]}``); a query's
passages are the chunks of its relevant files in the version. The held part is chosen by a hash of each
query's text, so the same file splits the same way on every machine and every run. Lineage: the job
reads the dataset version and the base model, and produces the trained version and its int8 variant,
whose gate records name the dataset version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.config import GateTolerance
from lamina.errors import InvalidRequestError
from lamina.models import TrainingData, TrainSettings, train_and_gate
from lamina.orchestration import JobContext

if TYPE_CHECKING:
    from lamina.stack._data import DataStack

#: passages paired with one query at most (its relevant files' first chunks)
PASSAGES_PER_QUERY = 8

#: each numeric argument: its type, default, and the least and most it may be
_NUMBERS: dict[str, tuple[type, float | None, float, float]] = {
    "held": (float, 0.2, 0.0, 1.0),
    "epochs": (int, 1, 1, 100),
    "batch_size": (int, 32, 2, 4096),
    "max_steps": (int, None, 1, 10**7),
    "seed": (int, 0, 0, 2**32 - 1),
    "threads": (int, None, 1, 1024),
    "tolerance": (float, None, -1.0, 1.0),
}


def check_train_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with numbers parsed and in range, and ``tolerance.NAME`` limits known; else an error."""
    out = dict(args)
    for key, (kind, default, low, high) in _NUMBERS.items():
        raw = args.get(key)
        if raw is None or raw == "":
            out[key] = default
            continue
        try:
            value = kind(str(raw))
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise InvalidRequestError(
                f"job argument {key}={raw!r} is not {what}; pass --arg {key}=VALUE"
            ) from None
        if not low <= value <= high or (key == "held" and value in (low, high)):
            bounds = f"between {low:g} and {high:g}" + (" (exclusive)" if key == "held" else "")
            raise InvalidRequestError(f"job argument {key}={raw} is out of range: give a value {bounds}")
        out[key] = value
    unknown = [k for k in args if k.startswith("tolerance.") and k[10:] not in GateTolerance.model_fields]
    if unknown:
        raise InvalidRequestError(
            f"unknown limit {unknown[0]}; the int8 gate's are tolerance.NAME with NAME one of "
            + ", ".join(GateTolerance.model_fields)
        )
    return out


def is_held(query: str, share: float) -> bool:
    """Whether ``query`` is in the held part (``share`` of all queries), by a hash of its text."""
    digest = hashlib.sha256(query.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def train(data: DataStack, args: dict[str, Any], job: JobContext) -> dict[str, Any]:
    """Run the train kind on the data stack ``data`` (its registry, catalog and vectors)."""
    from lamina.stack._job_bodies import _labelled, _source_path

    args = check_train_args(args)
    config = data.config
    version = data.catalog.resolve(str(args["dataset"]))
    base = str(args.get("base") or data.embedding_model_ref())
    job.read("dataset", version.ref, version_id=version.version_id)
    base_mv = data.registry.get(base)
    job.read("model", base_mv.ref)
    queries = _labelled(Path(str(args["queries"])))
    # a version embedded by the base's very file holds the base's passage vectors: the gate reuses them
    embedded_by = version.manifest.get("embedding_model") or {}
    reuse = embedded_by.get("sha256") == base_mv.sha256
    chunks = data.vectors.get(version.dataset, data.catalog.members(version), with_vectors=reuse)
    vectors = [c.vector for c in chunks if c.vector is not None] if reuse else []
    docs = [_source_path(c.source_uri).name for c in chunks]
    texts = [c.text for c in chunks]
    training = split(version.ref, queries, texts, docs, float(args["held"]))
    settings = TrainSettings(
        epochs=int(args["epochs"]),
        batch_size=int(args["batch_size"]),
        max_steps=None if args["max_steps"] is None else int(args["max_steps"]),
        seed=int(args["seed"]),
        threads=int(args["threads"] or 0),
    )
    limits = config.quantization.tolerance
    overrides = {
        k.removeprefix("tolerance."): float(v) for k, v in args.items() if k.startswith("tolerance.")
    }
    job.progress(0.01, f"training on {len(training.pairs)} pairs of {version.ref}, {len(training.held)} held")
    result = train_and_gate(
        data.registry,
        base_mv.ref,
        training,
        settings,
        name=args.get("name") or None,
        tolerance=limits.max_ndcg_drop if args["tolerance"] is None else float(args["tolerance"]),
        quant_tolerance={**limits.model_dump(), **overrides},
        base_vectors=vectors if vectors and len(vectors) == len(chunks) else None,
        progress=job.progress,
    )
    job.produced("model", result.trained, passed=result.gate["status"] == "passed", dataset=version.ref)
    if result.quantized is not None:
        job.produced("model", result.model, passed=result.passed, dataset=version.ref)
    return {**result.to_json(), "queries": len(queries)}


def split(
    dataset: str,
    queries: Sequence[tuple[str, set[str]]],
    texts: Sequence[str],
    docs: Sequence[str],
    held: float,
) -> TrainingData:
    """Training pairs from the queries not held, and the held ones whose relevant files are in the version."""
    by_doc: dict[str, list[str]] = {}
    for text, doc in zip(texts, docs, strict=True):
        by_doc.setdefault(doc, []).append(text)
    pairs: list[tuple[str, str]] = []
    kept: list[tuple[str, frozenset[str]]] = []
    for query, relevant in queries:
        if not relevant & by_doc.keys():
            continue
        if is_held(query, held):
            kept.append((query, frozenset(relevant)))
        else:
            passages = [t for doc in sorted(relevant) for t in by_doc.get(doc, [])]
            pairs += [(query, t) for t in passages[:PASSAGES_PER_QUERY]]
    if len(pairs) < 2 or not kept:
        named = sorted({doc for _, relevant in queries for doc in relevant})[:3]
        raise InvalidRequestError(
            f"{len(queries)} queries gave {len(pairs)} training pairs and {len(kept)} held queries on "
            f"{dataset} (it holds {len(by_doc)} files; the queries name e.g. {', '.join(named)}): a query "
            "counts when its relevant file names are files of the version; give more queries, or another held"
        )
    return TrainingData(
        dataset=dataset,
        pairs=tuple(pairs),
        passages=tuple(texts),
        passage_docs=tuple(docs),
        held=tuple(kept),
    )
