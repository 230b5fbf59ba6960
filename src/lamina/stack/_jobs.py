"""The job kinds the upper layers offer, registered with the orchestration layer's job queue, and the
scheduler wired to this machine's devices and the serving replicas.

Each kind is an entrypoint ``lamina.stack._jobs:<function>`` run in its own process; its context carries
the state directory and the config (as JSON), from which the function opens the layers it needs, as the
CLI does. The kinds:

- ``embed``: (re-)embed a dataset version with an embedding model: its source files go through the data
  layer's ingest pipeline again with that model, into a new version (of the same dataset, or ``target``).
  The pipeline is incremental by content: chunks the model already embedded are reused.
- ``eval``: retrieval quality of an embedding model on a dataset version: nDCG@10 and recall@10 of
  labelled queries (a JSONL file of ``{"query": ..., "relevant": [source file name, ...]}``), ranking the
  version's chunks by cosine to the query with that model (so any model can be evaluated on any version).
- ``quantize``: the models layer's quantization with its accuracy gate (``quantize_and_gate``).
- ``train``: fine-tune the embedding model on a dataset version's labelled queries, then export, quantize and
  register it behind the accuracy gate (:mod:`lamina.stack._train`; needs ``pip install 'lamina[train]'``).

``jobs.kinds`` in the config adds kinds of the user's own (``name: module:function``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from lamina.compute import FULL_GPU, ClusterSnapshot, Demand, GPUState, NodeInventory, NodeState
from lamina.config import LaminaConfig
from lamina.errors import InvalidRequestError
from lamina.orchestration import (
    DeploymentStatus,
    JobContext,
    JobKind,
    JobQueue,
    JobResources,
    JobScheduler,
    SchedulerSettings,
    WorkloadSpec,
)
from lamina.store import Store

_MIB = 1 << 20
_HERE = "lamina.stack._jobs"


def _require(args: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if not args.get(n)]
    if missing:
        given = ", ".join(f"{k}={v}" for k, v in args.items()) or "none"
        raise InvalidRequestError(
            f"missing job argument {', '.join(missing)} (given: {given}); pass --arg {missing[0]}=VALUE"
        )


class _Refs:
    """Whether a submitted job's dataset and model exist, so that a misspelt one is refused when it is
    submitted, with the names there are, not found minutes later when the job runs. Without a store (a
    queue's kinds listed without one) nothing is looked up."""

    def __init__(self, store: Store | None, state_dir: Path) -> None:
        self._store, self._state_dir = store, state_dir

    def dataset(self, args: dict[str, Any]) -> None:
        if self._store is not None:
            from lamina.data import DatasetCatalog

            DatasetCatalog(self._store).resolve(str(args["dataset"]))

    def model(self, args: dict[str, Any]) -> None:
        if self._store is not None:
            from lamina.stack._data import registry_of

            registry_of(self._store, self._state_dir).get(str(args["model"]))


def _check_embed(refs: _Refs, args: dict[str, Any]) -> dict[str, Any]:
    _require(args, "dataset")
    refs.dataset(args)
    return args


def _check_eval(refs: _Refs, args: dict[str, Any]) -> dict[str, Any]:
    _require(args, "dataset", "queries")
    path = Path(str(args["queries"])).expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"queries file {path} not found; give a JSONL file of labelled queries")
    refs.dataset(args)
    return {**args, "queries": str(path.resolve())}


def _check_train(refs: _Refs, args: dict[str, Any]) -> dict[str, Any]:
    from lamina.stack._train import check_train_args

    return check_train_args(_check_eval(refs, args))


def _check_quantize(refs: _Refs, args: dict[str, Any]) -> dict[str, Any]:
    _require(args, "model", "method")
    refs.model(args)
    return args


def job_kinds(config: LaminaConfig, state_dir: Path, store: Store | None = None) -> dict[str, JobKind]:
    """Every job kind of this stack: the built-in ones and the config's own; with ``store``, a job whose
    dataset or model is not in it is refused when submitted."""
    context = {"state_dir": str(state_dir), "config": config.model_dump_json()}
    refs = _Refs(store, state_dir)
    kinds = [
        JobKind(
            "embed",
            f"{_HERE}:run_embed",
            "(re-)embed a dataset version",
            context=context,
            check_args=partial(_check_embed, refs),
        ),
        JobKind(
            "eval",
            f"{_HERE}:run_eval",
            "retrieval nDCG@10/recall@10 of an embedding model",
            context=context,
            check_args=partial(_check_eval, refs),
        ),
        JobKind(
            "quantize",
            f"{_HERE}:run_quantize",
            "quantize a model behind the accuracy gate",
            resources=JobResources(cpus=1.0, memory_bytes=1024 * _MIB),
            context=context,
            check_args=partial(_check_quantize, refs),
            max_attempts=1,
        ),
        JobKind(
            "train",
            f"{_HERE}:run_train",
            "fine-tune the embedding model behind the accuracy gate (lamina[train])",
            resources=JobResources(cpus=1.0, memory_bytes=2048 * _MIB),
            context=context,
            check_args=partial(_check_train, refs),
            max_attempts=1,
        ),
    ]
    kinds += [
        JobKind(name, entrypoint, f"{entrypoint} (from the config)", context=context)
        for name, entrypoint in config.jobs.kinds.items()
    ]
    return {k.name: k for k in kinds}


def open_job_queue(config: LaminaConfig, state_dir: Path, store: Store) -> JobQueue:
    return JobQueue(store, job_kinds(config, state_dir, store))


def job_capacity(config: LaminaConfig, node: NodeInventory) -> ClusterSnapshot:
    """What serving and jobs share: the node's CPUs, memory and GPUs, or the config's ``jobs`` totals."""
    jobs = config.jobs
    cpus = jobs.cpus if jobs.cpus is not None else float(node.cpu.usable)
    memory = jobs.memory_bytes if jobs.memory_bytes is not None else node.memory_total_bytes
    gpus = [GPUState(g.index, FULL_GPU, g.memory_total_bytes) for g in node.gpus]
    if jobs.gpus is not None:
        gpus = gpus[: jobs.gpus] + [GPUState(i, FULL_GPU, 0) for i in range(len(gpus), jobs.gpus)]
    state = NodeState(
        name=node.hostname,
        cpu_milli_free=round(cpus * 1000),
        memory_free_bytes=memory,
        gpus=tuple(gpus),
        cpu_milli_total=round(cpus * 1000),
        memory_total_bytes=memory,
        gpu_model=node.gpus[0].name if node.gpus else None,
    )
    return ClusterSnapshot((state,))


def serving_demands(
    status: Callable[[], Sequence[DeploymentStatus]],
    workloads: Callable[[], Sequence[WorkloadSpec]],
    *,
    cpus: bool = True,
) -> Callable[[], list[Demand]]:
    """What the serving replicas hold now: per deployment, its live (or desired, if more) replicas times
    its workload's resources; without their CPUs when ``cpus`` is false (jobs below serving's OS priority
    use what the replicas leave idle, and the kernel gives the replicas the CPU first)."""

    def demands() -> list[Demand]:
        specs = {w.name: w for w in workloads()}
        out: list[Demand] = []
        for dep in status():
            spec = specs.get(dep.name)
            if spec is None:
                continue
            r = spec.resources
            milli = round(r.cpus * 1000) if cpus else 0
            one = Demand(cpu_milli=milli, memory_bytes=r.memory_mb * _MIB, num_gpus=r.gpus)
            out += [one] * max(dep.desired, len(dep.replicas))
        return out

    return demands


def job_scheduler(
    config: LaminaConfig,
    state_dir: Path,
    queue: JobQueue,
    node: NodeInventory,
    serving: Callable[[], Sequence[Demand]],
) -> JobScheduler:
    jobs = config.jobs
    settings = SchedulerSettings(
        interval_s=jobs.interval_s,
        retry_backoff_s=jobs.retry_backoff_s,
        retry_backoff_max_s=jobs.retry_backoff_max_s,
        stop_grace_s=jobs.stop_grace_s,
        nice=jobs.nice,
    )
    return JobScheduler(
        queue, state_dir / "jobs", total=job_capacity(config, node), serving=serving, settings=settings
    )


# -- the kinds' entrypoints (run in the job process) -------------------------------------------------


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
