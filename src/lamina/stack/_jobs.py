"""The job kinds the upper layers offer, registered with the orchestration layer's job queue, and the
scheduler wired to this machine's devices and the serving replicas.

Each kind is an entrypoint ``lamina.stack._job_bodies:<function>`` run in its own process; its context
carries the state directory and the config (as JSON), from which the function opens the layers it needs,
as the CLI does. The kinds:

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

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from lamina.compute import FULL_GPU, ClusterSnapshot, Demand, GPUState, NodeInventory, NodeState
from lamina.config import LaminaConfig
from lamina.errors import InvalidRequestError
from lamina.orchestration import (
    DeploymentStatus,
    JobKind,
    JobQueue,
    JobResources,
    JobScheduler,
    SchedulerSettings,
    WorkloadSpec,
)
from lamina.store import Store

_MIB = 1 << 20
#: the module of the built-in kinds' entrypoints
_BODIES = "lamina.stack._job_bodies"


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
            f"{_BODIES}:run_embed",
            "(re-)embed a dataset version",
            context=context,
            check_args=partial(_check_embed, refs),
        ),
        JobKind(
            "eval",
            f"{_BODIES}:run_eval",
            "retrieval nDCG@10/recall@10 of an embedding model",
            context=context,
            check_args=partial(_check_eval, refs),
        ),
        JobKind(
            "quantize",
            f"{_BODIES}:run_quantize",
            "quantize a model behind the accuracy gate",
            resources=JobResources(cpus=1.0, memory_bytes=1024 * _MIB),
            context=context,
            check_args=partial(_check_quantize, refs),
            max_attempts=1,
        ),
        JobKind(
            "train",
            f"{_BODIES}:run_train",
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
