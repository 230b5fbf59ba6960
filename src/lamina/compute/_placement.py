"""Where a workload goes: placement policies as pure functions of a frozen cluster snapshot.

A policy takes a :class:`ClusterSnapshot` and a :class:`Demand` and returns a :class:`Placement` (a node
and the GPUs on it) or None when nothing can host it; :func:`apply` gives the snapshot after a placement.
The loop that gathers snapshots and starts what was placed lives elsewhere, so policies are tested with
hand-built snapshots and compared on a trace by replaying it.

GPU shares follow the Alibaba GPU-sharing traces: a GPU has 1000 milli-GPUs; a demand asks for
``num_gpus`` whole GPUs, or for ``gpu_milli < 1000`` of one GPU that other workloads share.

- :func:`best_fit` packs: the node left with the least free GPU, then CPU and memory, and on it the
  fullest GPU that still fits; big holes stay open for big demands.
- :func:`spread` balances: the node left with the most free resources.
- :func:`fragmentation_aware` (FGD, Weng et al., USENIX ATC 2023) picks the placement that least grows
  the GPU capacity that the expected workload mix could no longer use (a GPU with 300 milli free is lost
  to every demand of 500; a node whose CPUs are gone loses all its GPUs), ties broken by best-fit.
- :func:`place_gang` places the parts of a multi-device workload all together or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from lamina.compute._devices import NodeInventory

FULL_GPU = 1000


@dataclass(frozen=True)
class GPUState:
    """A GPU's free share and memory (memory 0 on both sides: not tracked, as in the Alibaba traces)."""

    index: int
    milli_free: int = FULL_GPU
    memory_free_bytes: int = 0


@dataclass(frozen=True)
class NodeState:
    """What a node has left, and what it had."""

    name: str
    cpu_milli_free: int
    memory_free_bytes: int
    gpus: tuple[GPUState, ...] = ()
    cpu_milli_total: int = 0
    memory_total_bytes: int = 0
    gpu_model: str | None = None

    @property
    def gpu_milli_free(self) -> int:
        return sum(g.milli_free for g in self.gpus)


@dataclass(frozen=True)
class ClusterSnapshot:
    nodes: tuple[NodeState, ...]


@dataclass(frozen=True)
class Demand:
    """What one workload (or one part of a gang) asks for."""

    cpu_milli: int = 0
    memory_bytes: int = 0
    num_gpus: int = 0
    #: per GPU; below 1000 the workload shares one GPU (num_gpus must be 1)
    gpu_milli: int = FULL_GPU
    #: per GPU; 0: memory not tracked
    gpu_memory_bytes: int = 0
    #: only GPUs of this model (the trace's gpu_spec); None: any
    gpu_model: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.gpu_milli <= FULL_GPU:
            raise ValueError(f"gpu_milli {self.gpu_milli}: give 1 to 1000 (1000 is a whole GPU)")
        if self.gpu_milli < FULL_GPU and self.num_gpus > 1:
            raise ValueError(f"{self.num_gpus} GPUs at {self.gpu_milli} milli each: shares are of one GPU")

    @property
    def shares_gpu(self) -> bool:
        return self.num_gpus == 1 and self.gpu_milli < FULL_GPU


@dataclass(frozen=True)
class Placement:
    node: str
    gpus: tuple[int, ...]
    demand: Demand


PlacementPolicy = Callable[[ClusterSnapshot, Demand], Placement | None]


def _gpu_takes(gpu: GPUState, demand: Demand) -> bool:
    return gpu.milli_free >= demand.gpu_milli and gpu.memory_free_bytes >= demand.gpu_memory_bytes


def gpu_choices(node: NodeState, demand: Demand) -> list[tuple[int, ...]]:
    """The GPU sets of ``node`` that can host ``demand`` (``[()]`` for a CPU-only demand that fits)."""
    if node.cpu_milli_free < demand.cpu_milli or node.memory_free_bytes < demand.memory_bytes:
        return []
    if demand.num_gpus == 0:
        return [()]
    if demand.gpu_model is not None and node.gpu_model != demand.gpu_model:
        return []
    usable = [g for g in node.gpus if _gpu_takes(g, demand)]
    if demand.shares_gpu:
        return [(g.index,) for g in usable]
    if len(usable) < demand.num_gpus:
        return []
    # whole GPUs are interchangeable but for their memory: keep the roomiest for later
    usable.sort(key=lambda g: (g.memory_free_bytes, g.index))
    return [tuple(sorted(g.index for g in usable[: demand.num_gpus]))]


def place_on(node: NodeState, gpus: tuple[int, ...], demand: Demand) -> NodeState:
    """``node`` after ``demand`` took ``gpus`` on it."""
    taken = set(gpus)
    return replace(
        node,
        cpu_milli_free=node.cpu_milli_free - demand.cpu_milli,
        memory_free_bytes=node.memory_free_bytes - demand.memory_bytes,
        gpus=tuple(
            replace(
                g,
                milli_free=g.milli_free - demand.gpu_milli,
                memory_free_bytes=g.memory_free_bytes - demand.gpu_memory_bytes,
            )
            if g.index in taken
            else g
            for g in node.gpus
        ),
    )


def apply(snapshot: ClusterSnapshot, placement: Placement) -> ClusterSnapshot:
    """The snapshot after ``placement``."""
    return ClusterSnapshot(
        tuple(
            place_on(n, placement.gpus, placement.demand) if n.name == placement.node else n
            for n in snapshot.nodes
        )
    )


def _frac(free: int, total: int) -> float:
    return free / total if total > 0 else 0.0


def _left(node: NodeState, gpus: tuple[int, ...], demand: Demand) -> tuple[int, float, int]:
    """After placing: the node's free milli-GPUs, its free CPU and memory shares, the chosen GPUs' free."""
    after = place_on(node, gpus, demand)
    chosen = sum(g.milli_free for g in after.gpus if g.index in gpus)
    shares = _frac(after.cpu_milli_free, node.cpu_milli_total) + _frac(
        after.memory_free_bytes, node.memory_total_bytes
    )
    return after.gpu_milli_free, shares, chosen


def _options(snapshot: ClusterSnapshot, demand: Demand) -> list[tuple[NodeState, tuple[int, ...]]]:
    return [(n, gpus) for n in snapshot.nodes for gpus in gpu_choices(n, demand)]


def _best_fit_key(node: NodeState, gpus: tuple[int, ...], demand: Demand) -> tuple[object, ...]:
    gpu_left, shares, chosen = _left(node, gpus, demand)
    return (gpu_left, shares, chosen, node.name, gpus)


def best_fit(snapshot: ClusterSnapshot, demand: Demand) -> Placement | None:
    """The tightest placement: least free GPU on the node afterwards, then CPU and memory, then GPU."""
    options = _options(snapshot, demand)
    if not options:
        return None
    node, gpus = min(options, key=lambda o: _best_fit_key(o[0], o[1], demand))
    return Placement(node.name, gpus, demand)


def spread(snapshot: ClusterSnapshot, demand: Demand) -> Placement | None:
    """The loosest placement: the node left with the most free GPU share, CPU and memory."""
    options = _options(snapshot, demand)
    if not options:
        return None

    def key(option: tuple[NodeState, tuple[int, ...]]) -> tuple[object, ...]:
        node, gpus = option
        gpu_left, shares, chosen = _left(node, gpus, demand)
        gpu_share = gpu_left / (FULL_GPU * len(node.gpus)) if node.gpus else 0.0
        return (-(gpu_share + shares), -chosen, node.name, gpus)

    node, gpus = min(options, key=key)
    return Placement(node.name, gpus, demand)


def node_fragmentation(node: NodeState, mix: Sequence[tuple[Demand, float]]) -> float:
    """Milli-GPUs of ``node`` that the workload ``mix`` (demands with their shares of arrivals) is
    expected to be unable to use: all of its free GPU for a demand the node cannot host at all, else the
    free share of each GPU that cannot take the demand (FGD's F_n(M))."""
    total = 0.0
    for demand, weight in mix:
        if demand.num_gpus == 0 or not gpu_choices(node, demand):
            lost = node.gpu_milli_free
        else:
            lost = sum(g.milli_free for g in node.gpus if not _gpu_takes(g, demand))
        total += weight * lost
    return total


def fragmentation_aware(mix: Sequence[tuple[Demand, float]]) -> PlacementPolicy:
    """FGD: the placement that least increases the fragmentation of its node under ``mix`` (the demands
    expected, each with its share of arrivals, e.g. counted from a trace); ties go to best-fit."""
    weights = _normalised(mix)
    before: dict[NodeState, float] = {}

    def frag(node: NodeState) -> float:
        if node not in before:
            before[node] = node_fragmentation(node, weights)
            if len(before) > 100_000:  # snapshots change one node at a time: old states are garbage
                before.clear()
        return before[node]

    def policy(snapshot: ClusterSnapshot, demand: Demand) -> Placement | None:
        options = _options(snapshot, demand)
        if not options:
            return None

        def key(option: tuple[NodeState, tuple[int, ...]]) -> tuple[object, ...]:
            node, gpus = option
            growth = frag(place_on(node, gpus, demand)) - frag(node)
            return (round(growth, 6), *_best_fit_key(node, gpus, demand))

        node, gpus = min(options, key=key)
        return Placement(node.name, gpus, demand)

    return policy


def _normalised(mix: Sequence[tuple[Demand, float]]) -> list[tuple[Demand, float]]:
    merged: dict[Demand, float] = {}
    for demand, weight in mix:
        if weight < 0:
            raise ValueError(f"a workload mix weight is {weight}: give shares of 0 or more")
        merged[demand] = merged.get(demand, 0.0) + weight
    total = sum(merged.values())
    return [(d, w / total) for d, w in merged.items()] if total > 0 else []


def place_gang(
    snapshot: ClusterSnapshot, parts: Sequence[Demand], policy: PlacementPolicy
) -> tuple[Placement, ...] | None:
    """Every part of a multi-device workload placed by ``policy``, each seeing the ones before it, or
    None (and nothing placed) when any part cannot be. Biggest parts go first, as bin packing does."""
    order = sorted(
        range(len(parts)),
        key=lambda i: (-parts[i].num_gpus * parts[i].gpu_milli, -parts[i].memory_bytes, i),
    )
    placed: dict[int, Placement] = {}
    for i in order:
        found = policy(snapshot, parts[i])
        if found is None:
            return None
        placed[i] = found
        snapshot = apply(snapshot, found)
    return tuple(placed[i] for i in range(len(parts)))


def snapshot_of(nodes: Sequence[NodeInventory]) -> ClusterSnapshot:
    """A snapshot of what ``nodes`` have free now: the CPUs this process may use, available memory, and
    each GPU whole with its free memory (NVML does not say which share of a GPU others hold)."""
    return ClusterSnapshot(
        tuple(
            NodeState(
                name=n.hostname,
                cpu_milli_free=n.cpu.usable * 1000,
                memory_free_bytes=n.memory_available_bytes,
                gpus=tuple(GPUState(g.index, FULL_GPU, g.memory_free_bytes) for g in n.gpus),
                cpu_milli_total=n.cpu.logical * 1000,
                memory_total_bytes=n.memory_total_bytes,
                gpu_model=n.gpus[0].name if n.gpus else None,
            )
            for n in nodes
        )
    )
