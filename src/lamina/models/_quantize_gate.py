"""Quantize a registered version and register the result only with the accuracy gate's verdict.

The flow: resolve the parent (it must serve itself), write the quantized file to a scratch folder, measure
the variant against the parent (:mod:`lamina.models._gate`), then register the file as a new version of
the same name with its parent, method and figures (:meth:`Registry.add_variant`). A variant that fails is
registered too, so its figures stay on record, and the registry refuses to resolve it.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from lamina.config import GateTolerance
from lamina.errors import InvalidRequestError
from lamina.models._checksums import sha256_file
from lamina.models._gate import (
    HELD_PROMPTS,
    HELD_TEXTS,
    LabelledQuery,
    chat_figures,
    embedding_figures,
    limits_for,
)
from lamina.models._gate_record import GateRecord, judge
from lamina.models._model_version import ModelVersion
from lamina.models._quantize import check_method, quantize_file
from lamina.models._registry import Registry

if TYPE_CHECKING:  # the data layer (LanceDB, Arrow) loads only where a dataset is sampled
    from lamina.data import DatasetCatalog, VectorStore


@dataclass(frozen=True)
class GateResult:
    """What :func:`quantize_and_gate` did: the variant registered, its figures and the verdict."""

    ref: str
    parent: str
    method: str
    passed: bool
    figures: dict[str, float]
    tolerance: dict[str, float]
    reasons: tuple[str, ...]
    size_bytes: int
    parent_size_bytes: int
    quantize_s: float
    evaluate_s: float
    dataset: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reasons": list(self.reasons)}


def quantize_and_gate(
    registry: Registry,
    ref: str,
    method: str,
    tolerance: Mapping[str, float] | None = None,
    *,
    texts: Sequence[str] | None = None,
    queries: Sequence[Mapping[str, Any]] | None = None,
    prompts: Sequence[str] | None = None,
    dataset: str | None = None,
    version: str | None = None,
) -> GateResult:
    """Quantize ``ref`` with ``method`` and register it as a new version, servable only if the gate passes.

    ``tolerance``: limits by name (``min_cosine``, ``min_mean_cosine``, ``max_ndcg_drop``,
    ``min_agreement``, ``max_perplexity_ratio``), the rest from :class:`lamina.config.GateTolerance`'s
    defaults (callers with a config pass ``{**config.quantization.tolerance.model_dump(), **overrides}``).
    Embedding models embed ``texts`` (a sample of ``dataset``'s chunks, say; default: held sentences) and,
    given ``queries`` (``{"query": str, "relevant": [index into texts, ...]}``), compare nDCG@10. Chat
    models read ``prompts`` (default: held prompts). ``version`` defaults to ``PARENT-METHOD``.
    """
    limits = _tolerance(tolerance)
    parent = registry.get(ref)
    check_method(method, parent.format, parent.ref)
    with tempfile.TemporaryDirectory(prefix="lamina-quantize-") as scratch:
        started = time.perf_counter()
        out = quantize_file(parent.path, method, Path(scratch) / f"variant.{parent.format}")
        quantized = time.perf_counter()
        candidate = dataclasses.replace(
            parent, version="candidate", path=out, sha256=sha256_file(out), size_bytes=out.stat().st_size
        )
        figures = _measure(parent, candidate, texts, queries, prompts)
        evaluated = time.perf_counter()
        applied = limits_for(limits, parent.format)
        reasons = judge(figures, applied)
        record = GateRecord(
            parent_version=parent.version,
            method=method,
            status="failed" if reasons else "passed",
            figures=figures,
            tolerance=applied,
            dataset=dataset,
        )
        variant = registry.add_variant(out, parent, record, version)
    return GateResult(
        ref=variant.ref,
        parent=parent.ref,
        method=method,
        passed=not reasons,
        figures=figures,
        tolerance=applied,
        reasons=reasons,
        size_bytes=variant.size_bytes,
        parent_size_bytes=parent.size_bytes,
        quantize_s=round(quantized - started, 3),
        evaluate_s=round(evaluated - quantized, 3),
        dataset=dataset,
    )


def dataset_sample(
    catalog: DatasetCatalog, vectors: VectorStore, ref: str, size: int = 256
) -> tuple[str, list[str]]:
    """The version ``ref`` resolves to (``NAME@SEQ``) and up to ``size`` of its chunks' texts, spread evenly
    over its chunk ids (sorted, so the same version always gives the same sample)."""
    version = catalog.resolve(ref)
    ids = catalog.members(version)
    if not ids:
        raise InvalidRequestError(f"dataset {ref} has no chunks to evaluate on; give another --dataset")
    step = max(1, len(ids) // size)
    chunks = vectors.get(version.dataset, ids[::step][:size])
    return f"{version.dataset}@{version.seq}", [c.text for c in chunks]


def _tolerance(given: Mapping[str, float] | None) -> GateTolerance:
    try:
        return GateTolerance.model_validate(dict(given or {}))
    except ValidationError as exc:
        names = ", ".join(GateTolerance.model_fields)
        raise InvalidRequestError(
            f"invalid tolerance {dict(given or {})}: {exc.errors()[0]['msg']}; the limits are {names}",
            param="tolerance",
        ) from exc


def _measure(
    parent: ModelVersion,
    candidate: ModelVersion,
    texts: Sequence[str] | None,
    queries: Sequence[Mapping[str, Any]] | None,
    prompts: Sequence[str] | None,
) -> dict[str, float]:
    if parent.format == "gguf":
        return chat_figures(parent.path, candidate.path, list(prompts or HELD_PROMPTS))
    corpus = list(texts or HELD_TEXTS)
    return embedding_figures(parent, candidate, corpus, _labelled(queries or (), len(corpus)))


def _labelled(queries: Sequence[Mapping[str, Any]], n_texts: int) -> list[LabelledQuery]:
    out = []
    for i, q in enumerate(queries):
        relevant = frozenset(int(r) for r in q.get("relevant", ()))
        if not isinstance(q.get("query"), str) or not relevant or not relevant <= set(range(n_texts)):
            raise InvalidRequestError(
                f"labelled query {i} must be {{'query': text, 'relevant': [index into the texts, ...]}} "
                f"with indexes below {n_texts}; got {dict(q)}",
                param="queries",
            )
        out.append(LabelledQuery(q["query"], relevant))
    return out
