"""Placement policies on hand-built cluster snapshots: best-fit, spread, fragmentation-aware, gangs."""

from __future__ import annotations

import pytest

from lamina.compute import (
    FULL_GPU,
    ClusterSnapshot,
    CPUInfo,
    Demand,
    GPUInfo,
    GPUState,
    NodeInventory,
    NodeState,
    Placement,
    PlacementPolicy,
    apply,
    best_fit,
    fragmentation_aware,
    gpu_choices,
    node_fragmentation,
    place_gang,
    snapshot_of,
    spread,
)

GiB = 1024**3


def node(name: str, *gpu_free: int, cpu: int = 32_000, memory: int = 256 * GiB) -> NodeState:
    """A node with ``cpu`` milli-CPUs and ``memory`` free out of the same totals, and GPUs with the given
    free milli-GPUs."""
    return NodeState(
        name,
        cpu_milli_free=cpu,
        memory_free_bytes=memory,
        gpus=tuple(GPUState(i, free) for i, free in enumerate(gpu_free)),
        cpu_milli_total=32_000,
        memory_total_bytes=256 * GiB,
    )


def cluster(*nodes: NodeState) -> ClusterSnapshot:
    return ClusterSnapshot(nodes)


def share(milli: int, cpu: int = 1000) -> Demand:
    return Demand(cpu_milli=cpu, memory_bytes=GiB, num_gpus=1, gpu_milli=milli)


def whole(gpus: int, cpu: int = 1000) -> Demand:
    return Demand(cpu_milli=cpu, memory_bytes=GiB, num_gpus=gpus)


CPU_ONLY = Demand(cpu_milli=4000, memory_bytes=8 * GiB)


@pytest.mark.parametrize(
    ("snapshot", "demand", "expected"),
    [
        # a share goes to the fullest GPU that still holds it
        (cluster(node("a", 1000, 700), node("b", 500)), share(400), ("b", (0,))),
        (cluster(node("a", 1000, 700), node("b", 300)), share(400), ("a", (1,))),
        # whole GPUs only on GPUs nobody shares, on the node left with the least free GPU
        (cluster(node("a", 1000, 1000, 1000), node("b", 1000, 1000, 400)), whole(2), ("b", (0, 1))),
        # CPU-only work goes where it strands no GPU
        (cluster(node("gpu", 1000), node("cpu")), CPU_ONLY, ("cpu", ())),
        # nothing holds it
        (cluster(node("a", 900, 900)), whole(1), None),
        (cluster(node("a", 1000, cpu=500)), share(100), None),
    ],
)
def test_best_fit(
    snapshot: ClusterSnapshot, demand: Demand, expected: tuple[str, tuple[int, ...]] | None
) -> None:
    placed = best_fit(snapshot, demand)
    assert (None if placed is None else (placed.node, placed.gpus)) == expected


@pytest.mark.parametrize(
    ("snapshot", "demand", "expected"),
    [
        (cluster(node("a", 1000, 700), node("b", 1000, 1000)), share(400), ("b", (0,))),
        (cluster(node("busy", cpu=1000)), CPU_ONLY, None),
        (cluster(node("busy", cpu=8000), node("idle")), CPU_ONLY, ("idle", ())),
        (cluster(node("a", 1000, 200), node("b", 600)), share(500), ("a", (0,))),
    ],
)
def test_spread(
    snapshot: ClusterSnapshot, demand: Demand, expected: tuple[str, tuple[int, ...]] | None
) -> None:
    placed = spread(snapshot, demand)
    assert (None if placed is None else (placed.node, placed.gpus)) == expected


def test_gpu_choices_respect_model_memory_and_shares() -> None:
    typed = NodeState(
        "v", 8000, 64 * GiB, (GPUState(0, 1000, 16 * GiB), GPUState(1, 1000, 40 * GiB)), gpu_model="V100"
    )
    assert gpu_choices(typed, Demand(num_gpus=1, gpu_model="A100")) == []
    assert gpu_choices(typed, Demand(num_gpus=1, gpu_model="V100", gpu_memory_bytes=20 * GiB)) == [(1,)]
    assert gpu_choices(typed, Demand(num_gpus=1)) == [(0,)], "the roomiest GPU is kept for later"
    assert gpu_choices(typed, share(300)) == [(0,), (1,)]
    assert gpu_choices(typed, Demand(cpu_milli=9000)) == []


def test_demands_are_checked() -> None:
    with pytest.raises(ValueError, match="give 1 to 1000"):
        Demand(num_gpus=1, gpu_milli=0)
    with pytest.raises(ValueError, match="shares are of one GPU"):
        Demand(num_gpus=2, gpu_milli=500)


def test_apply_returns_a_new_snapshot_and_leaves_the_old_one() -> None:
    before = cluster(node("a", 1000, 1000), node("b", 1000))
    after = apply(before, Placement("a", (1,), share(250, cpu=2000)))
    assert before.nodes[0].gpus[1].milli_free == FULL_GPU
    assert after.nodes[0].gpus[1].milli_free == 750
    assert after.nodes[0].cpu_milli_free == 30_000 and after.nodes[0].memory_free_bytes == 255 * GiB
    assert after.nodes[1] is before.nodes[1]


def test_fragmentation_counts_what_the_mix_cannot_use() -> None:
    mix = [(share(500), 0.5), (whole(1), 0.5)]
    # GPU0 full: usable by both; GPU1 with 600: lost to whole-GPU demands; GPU2 with 200: lost to both
    assert node_fragmentation(node("a", 1000, 600, 200), mix) == pytest.approx(0.5 * 600 + 200)
    # no CPU left: every free GPU share is lost to every demand
    assert node_fragmentation(node("a", 1000, 600, cpu=0), mix) == pytest.approx(1600)


def test_fragmentation_aware_keeps_a_gpu_usable_where_best_fit_would_strand_it() -> None:
    snapshot = cluster(node("a", 1000), node("b", 600))
    demand = share(300)
    mix = [(share(500), 1.0)]
    assert best_fit(snapshot, demand) == Placement("b", (0,), demand)  # leaves 300: too little for a 500
    assert fragmentation_aware(mix)(snapshot, demand) == Placement("a", (0,), demand)


def _replay(policy: PlacementPolicy, snapshot: ClusterSnapshot, demands: list[Demand]) -> int:
    placed = 0
    for demand in demands:
        found = policy(snapshot, demand)
        if found is not None:
            snapshot, placed = apply(snapshot, found), placed + 1
    return placed


def test_fragmentation_aware_places_more_of_a_sharing_workload_than_best_fit() -> None:
    snapshot = cluster(node("a", 1000), node("b", 1000))
    arrivals = [share(400), share(400), share(600), share(600)]
    mix = [(share(400), 0.5), (share(600), 0.5)]
    assert _replay(best_fit, snapshot, arrivals) == 3  # 400 + 400 on one GPU strands 200
    assert _replay(fragmentation_aware(mix), snapshot, arrivals) == 4
    assert _replay(spread, snapshot, arrivals) == 4


def test_a_gang_is_placed_whole_or_not_at_all() -> None:
    snapshot = cluster(node("a", 1000, 1000), node("b", 1000, 1000, 1000))
    parts = [whole(2), whole(2)]
    placed = place_gang(snapshot, parts, best_fit)
    assert placed is not None and sorted(p.node for p in placed) == ["a", "b"]
    assert place_gang(snapshot, [whole(2), whole(2), whole(2)], best_fit) is None
    assert place_gang(snapshot, [whole(1)] * 5, spread) is not None
    assert place_gang(snapshot, [whole(1)] * 6, spread) is None
    assert snapshot == cluster(node("a", 1000, 1000), node("b", 1000, 1000, 1000)), "nothing was taken"


def test_a_gang_returns_its_parts_in_order_with_the_biggest_placed_first() -> None:
    snapshot = cluster(node("a", 1000, 1000, 1000))
    parts = [share(500), whole(2)]
    placed = place_gang(snapshot, parts, best_fit)
    assert placed == (Placement("a", (2,), parts[0]), Placement("a", (0, 1), parts[1]))


def test_a_snapshot_of_the_inventory() -> None:
    inventory = NodeInventory(
        "vm",
        CPUInfo("cpu", 4, 8, (0, 1, 2, 3), 2),
        32 * GiB,
        20 * GiB,
        (GPUInfo(0, "NVIDIA L4", "GPU-0", 24 * GiB, 4 * GiB),),
    )
    (state,) = snapshot_of([inventory]).nodes
    assert state == NodeState(
        "vm", 4000, 20 * GiB, (GPUState(0, FULL_GPU, 20 * GiB),), 8000, 32 * GiB, "NVIDIA L4"
    )
