"""Will it fit: one replica's memory against each device of each node, and how many replicas fit.

Pure arithmetic over an inventory: the models layer says what a replica needs (:class:`MemoryEstimate`);
this says which devices can hold it now (their available memory, not their total: what other processes
hold is not ours to take) and, when the replicas asked for cannot all fit, what to change.

A CPU replica lives in the node's RAM. A one-GPU replica needs that GPU's memory free, and several may
share a GPU whose free memory holds them. A replica over ``gpus`` GPUs takes that many GPUs of one node
whole, each with its share of the estimate free (split evenly, as llama.cpp splits layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lamina.compute._devices import NodeInventory

_GIB = 1024**3


def gib(n: int) -> str:
    """``n`` bytes as GiB with two decimals, the unit fit messages use."""
    return f"{n / _GIB:.2f} GiB"


@dataclass(frozen=True)
class MemoryEstimate:
    """What one replica holds in memory, by part."""

    #: the model's files (weights are mapped or loaded whole)
    weights_bytes: int
    #: the runtime: the worker process, the engine library, its buffers
    runtime_bytes: int
    #: the KV cache of every parallel slot at the context size, from the model's header; None where the
    #: estimate does not separate it from ``runtime_bytes``
    kv_cache_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.runtime_bytes + (self.kv_cache_bytes or 0)


@dataclass(frozen=True)
class DeviceFit:
    """One device's answer: how many replicas its available memory holds."""

    node: str
    #: ``ram`` or ``gpu<index>``
    device: str
    name: str
    total_bytes: int
    available_bytes: int
    replicas: int


@dataclass(frozen=True)
class FitReport:
    """Whether ``replicas`` replicas of ``estimate`` fit, device by device."""

    estimate: MemoryEstimate
    #: GPUs per replica; 0: the replica runs in RAM
    gpus: int
    replicas: int
    devices: tuple[DeviceFit, ...]
    #: replicas that fit at once over all nodes (for multi-GPU replicas: whole gangs on one node)
    replicas_possible: int

    @property
    def fits(self) -> bool:
        return self.replicas_possible >= self.replicas

    def explain(self, what: str = "") -> str:
        """One paragraph for people: the numbers, the verdict and, when it does not fit, what to change."""
        need = self.estimate.total_bytes
        where = "RAM" if self.gpus == 0 else f"{self.gpus} GPU(s) of one node"
        best = max(self.devices, key=lambda d: d.available_bytes, default=None)
        have = "no such device" if best is None else f"{gib(best.available_bytes)} available on {best.name}"
        head = (
            f"{what + ': ' if what else ''}{self.replicas} replica(s) x {gib(need)} ({self.parts()}) in "
            f"{where}; "
            f"{self.replicas_possible} fit now ({have})"
        )
        if self.fits:
            return head
        return (
            f"{head}; it does not fit: use a smaller context (n_ctx), fewer parallel slots, fewer "
            "replicas or a smaller quantisation of the model, or free memory"
        )

    def parts(self) -> str:
        e = self.estimate
        if e.kv_cache_bytes is None:
            return f"weights {gib(e.weights_bytes)} + KV cache and runtime {gib(e.runtime_bytes)}"
        return (
            f"weights {gib(e.weights_bytes)} + KV cache {gib(e.kv_cache_bytes)} + runtime "
            f"{gib(e.runtime_bytes)}"
        )


def _ram(node: NodeInventory, need: int) -> DeviceFit:
    available = node.memory_available_bytes
    return DeviceFit(
        node=node.hostname,
        device="ram",
        name=f"{node.hostname} RAM",
        total_bytes=node.memory_total_bytes,
        available_bytes=available,
        replicas=available // need if need > 0 else 0,
    )


def _gpu_fits(node: NodeInventory, per_gpu: int, whole: bool) -> list[DeviceFit]:
    def holds(free: int) -> int:
        n = free // per_gpu if per_gpu > 0 else 0
        return min(n, 1) if whole else n

    return [
        DeviceFit(
            node=node.hostname,
            device=f"gpu{g.index}",
            name=f"{node.hostname} GPU {g.index} ({g.name})",
            total_bytes=g.memory_total_bytes,
            available_bytes=g.memory_free_bytes,
            replicas=holds(g.memory_free_bytes),
        )
        for g in node.gpus
    ]


def fit(
    estimate: MemoryEstimate, nodes: Sequence[NodeInventory], *, gpus: int = 0, replicas: int = 1
) -> FitReport:
    """Which devices of ``nodes`` hold ``replicas`` replicas of ``estimate``, each on ``gpus`` GPUs (0:
    in RAM)."""
    need = max(estimate.total_bytes, 1)
    devices: list[DeviceFit] = []
    possible = 0
    for node in nodes:
        if gpus == 0:
            ram = _ram(node, need)
            devices.append(ram)
            possible += ram.replicas
            continue
        per_gpu = -(-need // gpus)
        found = _gpu_fits(node, per_gpu, whole=gpus > 1)
        devices += found
        # a replica takes one slot on each of ``gpus`` distinct GPUs of its node: fill the roomiest first
        slots = sorted((d.replicas for d in found), reverse=True)
        possible += _gangs(slots, gpus)
    return FitReport(estimate, gpus, replicas, tuple(devices), possible)


def _gangs(slots: list[int], size: int) -> int:
    """How many groups of ``size`` distinct GPUs can be formed, GPU ``i`` taking part in at most
    ``slots[i]`` groups (the greedy on the roomiest GPUs is exact)."""
    slots = [s for s in slots if s > 0]
    if size == 1:
        return sum(slots)
    count = 0
    while len(slots) >= size:
        slots.sort(reverse=True)
        for i in range(size):
            slots[i] -= 1
        slots = [s for s in slots if s > 0]
        count += 1
    return count
