"""Will the deployments fit: each engine's estimate of a replica, checked against the machine's inventory
before anything starts.

The models layer's engine descriptor says what one replica needs (its ``Resources``: memory from the
model's files and, for GGUF, the KV cache its header implies at the deployment's context and parallel
slots). This module splits that into weights and the rest, and places every replica of every deployment
on a snapshot of the inventory (best-fit, GPUs whole or shared by memory), so that two deployments that
fit alone but not together are refused too. A refusal is a ConfigError with the numbers and what to change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lamina.compute import (
    Demand,
    FitReport,
    MemoryEstimate,
    NodeInventory,
    apply,
    best_fit,
    fit,
    place_gang,
    snapshot_of,
)
from lamina.errors import ConfigError
from lamina.models import Registry, engine_descriptor, engine_for_format, registered_or_bundled
from lamina.orchestration import Resources, WorkloadSpec

_MIB = 1 << 20


@dataclass(frozen=True)
class ReplicaNeed:
    """What ``replicas`` replicas of one deployment (or one model, for ``lamina compute fit``) need."""

    name: str
    estimate: MemoryEstimate
    #: GPUs per replica (0: it runs in RAM)
    gpus: int
    replicas: int
    #: what people should know about the estimate (a context capped at the model's own)
    notes: tuple[str, ...] = ()

    def demand(self) -> Demand:
        """One replica as placement sees it: RAM; one GPU's memory (GPUs are shared by memory, so its
        compute share is nominal); or several GPUs whole, with its memory split over them."""
        total = self.estimate.total_bytes
        if self.gpus == 0:
            return Demand(memory_bytes=total)
        if self.gpus == 1:
            return Demand(num_gpus=1, gpu_milli=1, gpu_memory_bytes=total)
        return Demand(num_gpus=self.gpus, gpu_memory_bytes=math.ceil(total / self.gpus))

    def report(self, nodes: Sequence[NodeInventory]) -> FitReport:
        return fit(self.estimate, nodes, gpus=self.gpus, replicas=self.replicas)


def replica_need(name: str, resources: Resources, files: Sequence[Path], replicas: int) -> ReplicaNeed:
    """The engine's ``resources`` for one replica, its weights (the model's files) split out."""
    weights = sum(f.stat().st_size for f in files if f.is_file())
    total = resources.memory_mb * _MIB
    estimate = MemoryEstimate(weights_bytes=weights, runtime_bytes=max(total - weights, 0))
    return ReplicaNeed(name, estimate, resources.gpus, replicas)


def model_need(
    registry: Registry, ref: str, *, engine: str | None, options: Mapping[str, Any], replicas: int
) -> tuple[ReplicaNeed, str]:
    """What ``replicas`` replicas of the registered (or bundled) model ``ref`` need with ``options`` for
    its engine, and that engine's name."""
    mv = registered_or_bundled(registry, ref)
    descriptor = engine_for_format(mv.format) if engine is None else engine_descriptor(engine)
    parsed = descriptor.parse_options(options, f"model {mv.ref}")
    files = [mv.path, *mv.extra_files.values()]
    need = replica_need(mv.ref, descriptor.resources(files, parsed), files, replicas)
    trained, asked = mv.meta.get("context_length"), getattr(parsed, "n_ctx", None)
    if isinstance(trained, int) and isinstance(asked, int) and asked > trained:
        note = f"n_ctx {asked} is capped at the model's own context of {trained} tokens, as its engine does"
        need = replace(need, notes=(note,))
    return need, descriptor.name


def workload_needs(
    registry: Registry, deployed: Sequence[tuple[str | None, WorkloadSpec]]
) -> list[ReplicaNeed]:
    """Each deployment's need from its workload (its model ``NAME@VERSION``, None: no model file)."""
    needs = []
    for ref, workload in deployed:
        files = [] if ref is None else [(mv := registry.get(ref)).path, *mv.extra_files.values()]
        needs.append(replica_need(workload.name, workload.resources, files, workload.replicas))
    return needs


def check_fit(needs: Sequence[ReplicaNeed], nodes: Sequence[NodeInventory]) -> None:
    """Place every replica of ``needs``, in order, on what ``nodes`` have available; a ConfigError names the
    first deployment that cannot be placed, with its numbers and what to change."""
    snapshot = snapshot_of(nodes)
    placed: list[str] = []
    for need in needs:
        if need.replicas == 0:
            continue
        found = place_gang(snapshot, [need.demand()] * need.replicas, best_fit)
        if found is None:
            report = need.report(nodes)
            beside = (
                f"; it would fit alone, but not beside {', '.join(placed)}: lower the replicas, context "
                "or parallel slots of one of them"
                if report.fits and placed
                else ""
            )
            raise ConfigError(
                f"deployment {need.name!r} does not fit on this machine, so nothing was started: "
                f"{report.explain()}{beside} (`lamina compute fit MODEL --ctx N --parallel P` "
                "tries other settings)"
            )
        for placement in found:
            snapshot = apply(snapshot, placement)
        placed.append(need.name)
