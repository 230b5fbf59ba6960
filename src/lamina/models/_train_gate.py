"""Fine-tune the embedding model; register it, and its int8 variant, only with the accuracy gate's verdict.

Two gates, both kept as gate records (:class:`GateRecord`), so a version that fails is registered with its
figures and the registry refuses to serve it:

- the trained model against the model it replaces (the base, as registered and served): retrieval nDCG@10
  of the held-out queries over every passage of the dataset version, documents ranked by their best
  passage (as the ``eval`` job ranks them). It may be worse than the base by at most the tolerance
  (``ndcg_drop``, base minus trained, negative when training helped; a negative tolerance demands a gain).
  Its record's method is ``train``, its parent the base's version, its dataset the version trained on.
- its int8 variant against it (:func:`quantize_and_gate`, the quantization gate and its tolerance), on the
  held queries' passages and a spread of the others. Quantizing is skipped when training failed its gate.

The trained model is a new version of the base's name (or ``name``): the next integer version, gated, so
a bare name keeps serving what it served until a rollout or an alias moves it.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lamina.errors import InvalidRequestError
from lamina.models._builtin_engines import ONNXOptions
from lamina.models._checksums import sha256_file
from lamina.models._embedder import EngineEmbedder
from lamina.models._gate import ndcg_at_10
from lamina.models._gate_record import GateRecord, judge
from lamina.models._model_version import ModelVersion, check_name
from lamina.models._quantize_gate import GateResult, quantize_and_gate
from lamina.models._registry import Registry
from lamina.models._train import (
    Progress,
    TrainSettings,
    export_onnx,
    extract_base_weights,
    fine_tune,
    load_model,
    require_training,
)

TRAIN_METHOD = "train"
INT8_METHOD = "onnx-int8-per-channel"
#: passages the int8 gate embeds at most (the held queries' own first, then a spread of the others)
_INT8_SAMPLE = 512


@dataclass(frozen=True)
class TrainingData:
    """What a training run learns from and is judged on: pairs, and held queries over a passage corpus."""

    #: the dataset version (``NAME@SEQ``) everything below came from
    dataset: str
    pairs: tuple[tuple[str, str], ...]
    #: every passage (chunk text) of the version, and the document (source file name) of each
    passages: tuple[str, ...]
    passage_docs: tuple[str, ...]
    #: held-out queries and the documents relevant to each
    held: tuple[tuple[str, frozenset[str]], ...]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_and_gate` did; ``model`` is the version to serve (the int8 one) when ``passed``."""

    model: str
    trained: str
    base: str
    dataset: str
    passed: bool
    reasons: tuple[str, ...]
    ndcg_base: float
    ndcg_trained: float
    train_pairs: int
    held_queries: int
    steps: int
    loss_first: float
    loss_last: float
    seconds: dict[str, float]
    gate: dict[str, Any]
    quantized: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reasons": list(self.reasons)}


def train_and_gate(
    registry: Registry,
    base_ref: str,
    data: TrainingData,
    settings: TrainSettings,
    *,
    name: str | None = None,
    tolerance: float = 0.01,
    quant_tolerance: Mapping[str, float] | None = None,
    base_vectors: Sequence[Sequence[float]] | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Fine-tune all-MiniLM-L6-v2 on ``data.pairs``, gate it against ``base_ref`` (``tolerance``: the most
    nDCG@10 may drop), register it, then quantize it behind the quantization gate (``quant_tolerance``).

    ``base_vectors``: the base's vectors of ``data.passages`` when the caller has them (a dataset version
    embedded by that very file), so that the gate embeds the corpus once, with the trained model only."""
    require_training()
    _check_data(data)
    report = progress or (lambda fraction, message: None)
    base = registry.get(base_ref)
    if base.format != "onnx":
        raise InvalidRequestError(f"{base.ref} is {base.format}; training fine-tunes an ONNX embedding model")
    target = check_name("name", name, 200) if name else base.name
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lamina-train-") as scratch:
        clock = _Phases(seconds)
        out, folder, losses = _train_and_export(Path(scratch), base, data, settings, clock, report)
        parent = _trained_parent(base, target, folder / "tokenizer.json")
        report(0.66, f"gate: nDCG@10 of {len(data.held)} held queries, {base.ref} and the trained model")
        candidate = dataclasses.replace(
            parent, version="candidate", path=out, sha256=sha256_file(out), size_bytes=out.stat().st_size
        )
        ndcg_base = _doc_ndcg(base, data, settings.threads, base_vectors)
        ndcg_trained = _doc_ndcg(candidate, data, settings.threads)
        record = _train_record(base, data, ndcg_base, ndcg_trained, tolerance, len(losses))
        trained = registry.add_variant(out, parent, record, _next_version(registry, parent.name))
        clock.done("gate")
    quantized = None
    if record.passed:
        report(0.85, f"quantizing {trained.ref} with {INT8_METHOD}")
        texts, labelled = _int8_sample(data)
        quantized = quantize_and_gate(
            registry,
            trained.ref,
            INT8_METHOD,
            quant_tolerance,
            texts=texts,
            queries=labelled,
            dataset=data.dataset,
        )
        seconds["quantize"] = quantized.quantize_s
        seconds["gate"] = round(seconds["gate"] + quantized.evaluate_s, 3)
    return _result(base, trained, data, record, losses, seconds, quantized)


def _train_and_export(
    scratch: Path,
    base: ModelVersion,
    data: TrainingData,
    settings: TrainSettings,
    clock: _Phases,
    report: Progress,
) -> tuple[Path, Path, list[float]]:
    """Fine-tune the shipped weights on ``data.pairs`` and export the model to ONNX in ``scratch``, its
    provenance in the file; the ONNX file, the weights' folder and the training losses."""
    report(0.02, "loading all-MiniLM-L6-v2's weights")
    folder = extract_base_weights(scratch)
    model = load_model(folder, settings)
    losses = fine_tune(model, data.pairs, settings, lambda f, m: report(0.05 + 0.55 * f, m))
    clock.done("train")
    report(0.62, "exporting to ONNX")
    provenance = {"lamina.dataset": data.dataset, "lamina.base": base.ref, "lamina.seed": f"{settings.seed}"}
    out = export_onnx(model, scratch / "model.onnx", provenance)
    del model
    clock.done("export")
    return out, folder, losses


class _Phases:
    """Seconds per phase, each from the end of the one before."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self._seconds = seconds
        self._since = time.perf_counter()

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self._seconds[phase] = round(now - self._since, 3)
        self._since = now


def _train_record(
    base: ModelVersion,
    data: TrainingData,
    ndcg_base: float,
    ndcg_trained: float,
    tolerance: float,
    steps: int,
) -> GateRecord:
    """The gate's verdict on the trained model: its held nDCG@10 against ``base``'s."""
    figures = {
        "ndcg_parent": ndcg_base,
        "ndcg_variant": ndcg_trained,
        "ndcg_drop": ndcg_base - ndcg_trained,
        "held_queries": float(len(data.held)),
        "train_pairs": float(len(data.pairs)),
        "steps": float(steps),
    }
    limits = {"max_ndcg_drop": tolerance}
    return GateRecord(
        parent_version=base.version,
        method=TRAIN_METHOD,
        status="failed" if judge(figures, limits) else "passed",
        figures=figures,
        tolerance=limits,
        dataset=data.dataset,
    )


def _result(
    base: ModelVersion,
    trained: ModelVersion,
    data: TrainingData,
    record: GateRecord,
    losses: Sequence[float],
    seconds: dict[str, float],
    quantized: GateResult | None,
) -> TrainResult:
    reasons = record.reasons + (quantized.reasons if quantized is not None else ())
    return TrainResult(
        model=quantized.ref if quantized is not None else trained.ref,
        trained=trained.ref,
        base=base.ref,
        dataset=data.dataset,
        passed=record.passed and quantized is not None and quantized.passed,
        reasons=reasons,
        ndcg_base=round(record.figures["ndcg_parent"], 4),
        ndcg_trained=round(record.figures["ndcg_variant"], 4),
        train_pairs=len(data.pairs),
        held_queries=len(data.held),
        steps=len(losses),
        loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4),
        seconds=seconds,
        gate=record.to_json(),
        quantized=None if quantized is None else quantized.to_json(),
    )


def _check_data(data: TrainingData) -> None:
    if len(data.passages) != len(data.passage_docs):
        raise InvalidRequestError("training data: passages and passage_docs differ in length")
    if not data.held:
        raise InvalidRequestError(
            f"no held-out queries to gate the trained model on ({data.dataset}); raise held or give more "
            "queries"
        )


def _trained_parent(base: ModelVersion, name: str, tokenizer: Path) -> ModelVersion:
    """``base`` as the trained version's parent, under ``name``, with the tokenizer it was trained with."""
    return dataclasses.replace(
        base,
        name=name,
        extra_files={"tokenizer": tokenizer},
        extra_sha256={"tokenizer": sha256_file(tokenizer)},
    )


def _next_version(registry: Registry, name: str) -> str:
    numbers = [int(mv.version) for mv in registry.list() if mv.name == name and mv.version.isdigit()]
    return str(max(numbers, default=0) + 1)


def _doc_ndcg(
    mv: ModelVersion, data: TrainingData, threads: int, passages: Sequence[Sequence[float]] | None = None
) -> float:
    """Mean nDCG@10 of the held queries, documents ranked by their best passage's cosine (``passages``:
    the passages' vectors by ``mv`` if known, else embedded here)."""
    texts = [*(data.passages if passages is None else ()), *(q for q, _ in data.held)]
    embedder = EngineEmbedder(mv, ONNXOptions(batch_size=32, intra_op_threads=threads or None))
    try:
        vectors = np.asarray(embedder.embed(texts), dtype=np.float64)
    finally:
        embedder.close()
    if passages is not None:
        vectors = np.concatenate(
            [np.asarray(passages, dtype=np.float64).reshape(-1, vectors.shape[1]), vectors]
        )
    n = len(data.passages)
    ids = {doc: i for i, doc in enumerate(dict.fromkeys(data.passage_docs))}
    docs = [ids[d] for d in data.passage_docs]
    total = 0.0
    for row, (_, relevant) in zip(vectors[n:] @ vectors[:n].T, data.held, strict=True):
        ranked: list[int] = []
        for i in np.argsort(-row, kind="stable"):
            if docs[i] not in ranked:
                ranked.append(docs[i])
                if len(ranked) == 10:
                    break
        # a relevant document missing from the version still counts in the ideal ranking, as in `eval`
        wanted = frozenset(ids.get(doc, -1 - k) for k, doc in enumerate(sorted(relevant)))
        total += ndcg_at_10(ranked, wanted)
    return total / len(data.held)


def _int8_sample(data: TrainingData) -> tuple[list[str], list[dict[str, Any]]]:
    """The held queries' passages and a spread of the others (at most ``_INT8_SAMPLE``), and the held
    queries labelled by index into them."""
    wanted = {doc for _, relevant in data.held for doc in relevant}
    own = [i for i, doc in enumerate(data.passage_docs) if doc in wanted][:_INT8_SAMPLE]
    others = [i for i in range(len(data.passages)) if data.passage_docs[i] not in wanted]
    room = _INT8_SAMPLE - len(own)
    picked = own + (others[:: max(1, len(others) // room)][:room] if room > 0 and others else [])
    texts = [data.passages[i] for i in picked]
    labelled = []
    for query, relevant in data.held:
        hits = [k for k, i in enumerate(picked) if data.passage_docs[i] in relevant]
        if hits:
            labelled.append({"query": query, "relevant": hits})
    return texts, labelled
