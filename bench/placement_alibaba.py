"""GPU placement policies on the Alibaba GPU cluster trace, by the inflation method.

    .venv/bin/python bench/placement_alibaba.py [PODS.csv] [--nodes gpu|all|FILE.csv] [--seed 0]
        [--repeats 1] [--policies best-fit,first-fit,spread,fgd] [--mix gpu|count] [--check N] [--json]

The trace (../shared/data/traces/alibaba-openb-2023/, "Beware of Fragmentation", USENIX ATC 2023) gives a
node list (cpu_milli, memory_mib, gpu, model) and a pod list (cpu_milli, memory_mib, num_gpu, gpu_milli,
gpu_spec); the pod list is a distribution of shapes, not a timeline. Inflation: draw pods from the list
with replacement (seeded), place each one and never remove any, until the GPUs requested (placed or not)
reach the cluster's GPU capacity; then report the share of GPU capacity allocated (allocated milli-GPUs
over 1000 x GPUs), the GPUs left wholly idle and the pods that could not be placed. Every policy sees the
same draws for a seed; ``--repeats`` runs seeds seed..seed+R-1 and averages.

Policies: ``best-fit``, ``spread`` and ``fgd`` are :mod:`lamina.compute`'s ``best_fit``, ``spread`` and
``fragmentation_aware`` (FGD, whose workload mix is the pod list's distribution of shapes);
``first-fit`` is a bench-local baseline (the first node in list order that fits, its lowest GPUs).
FGD's mix weighs each shape by its share of the GPUs the list requests (``--mix gpu``, the default;
CPU-only shapes drop out) or by its share of the pods
(``--mix count``). GPU weighting allocates more: under inflation a pod that cannot be placed costs its
GPUs, so keeping room for an 8-GPU pod matters eight times as much as for a one-GPU pod (default list,
seeds 0-2: 94.98% against 94.71% with count weighting).

The library policies are pure functions over a frozen snapshot and rebuild node states for every option,
which is fine for a scheduler's one decision but too slow for 8,000+ placements over 1,213 nodes. So the
bench evaluates the very same keys (same tie-breaks, same float expressions, FGD's fragmentation memoised
by node state) over mutable per-node state, and tests/unit/test_placement_bench.py checks decision by
decision that it picks what the library picks. ``--check N`` also runs the library policy on the first N
placements of each run here and fails on any difference.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina.compute import (
    FULL_GPU,
    ClusterSnapshot,
    Demand,
    GPUState,
    NodeState,
    Placement,
    PlacementPolicy,
    apply,
    best_fit,
    fragmentation_aware,
    spread,
)

TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces" / "alibaba-openb-2023"
MIB = 1024**2
POLICIES = ("best-fit", "first-fit", "spread", "fgd")


@dataclass(frozen=True)
class Pod:
    demand: Demand
    #: GPU models the pod may use (``gpu_spec``, ``|``-separated); None: any
    models: frozenset[str] | None = None


def load_nodes(path: Path) -> list[NodeState]:
    nodes = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            cpu, mem = int(row["cpu_milli"]), int(row["memory_mib"]) * MIB
            nodes.append(
                NodeState(
                    name=row["sn"],
                    cpu_milli_free=cpu,
                    memory_free_bytes=mem,
                    gpus=tuple(GPUState(i) for i in range(int(row["gpu"] or 0))),
                    cpu_milli_total=cpu,
                    memory_total_bytes=mem,
                    gpu_model=row.get("model") or None,
                )
            )
    return nodes


def load_pods(path: Path) -> list[Pod]:
    pods = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            num = int(row["num_gpu"] or 0)
            milli = int(row["gpu_milli"] or 0) if num else FULL_GPU
            spec = (row.get("gpu_spec") or "").strip()
            models = frozenset(spec.split("|")) if spec else None
            demand = Demand(
                cpu_milli=int(row["cpu_milli"]),
                memory_bytes=int(row["memory_mib"]) * MIB,
                num_gpus=num,
                gpu_milli=milli if num else FULL_GPU,
                gpu_model=next(iter(models)) if models is not None and len(models) == 1 else None,
            )
            pods.append(Pod(demand, models))
    return pods


MIXES = ("gpu", "count")


def workload_mix(pods: Sequence[Pod], weighting: str = "gpu") -> list[tuple[Demand, float]]:
    """The pod list's shapes, each weighted by its share of the GPUs requested (``gpu``: CPU-only shapes
    drop out) or of the pods (``count``); weights not normalised (the policy does that)."""
    weights: dict[Demand, float] = {}
    for p in pods:
        d = p.demand
        weight = d.num_gpus * d.gpu_milli / FULL_GPU if weighting == "gpu" else 1.0
        weights[d] = weights.get(d, 0.0) + weight
    return [(d, w) for d, w in weights.items() if w > 0]


def _normalised(mix: Sequence[tuple[Demand, float]]) -> list[tuple[Demand, float]]:
    """As ``fragmentation_aware`` normalises its mix (the same float operations, so the same figures)."""
    merged: dict[Demand, float] = {}
    for demand, weight in mix:
        merged[demand] = merged.get(demand, 0.0) + weight
    total = sum(merged.values())
    return [(d, w / total) for d, w in merged.items()] if total > 0 else []


class Cluster:
    """Mutable per-node state with the library policies' keys evaluated in place."""

    def __init__(self, nodes: Sequence[NodeState], mix: Sequence[tuple[Demand, float]] = ()) -> None:
        self.names = [n.name for n in nodes]
        self.cpu = [n.cpu_milli_free for n in nodes]
        self.mem = [n.memory_free_bytes for n in nodes]
        self.cpu_total = [n.cpu_milli_total for n in nodes]
        self.mem_total = [n.memory_total_bytes for n in nodes]
        self.model = [n.gpu_model for n in nodes]
        self.gpus = [[g.milli_free for g in n.gpus] for n in nodes]
        self.mix = [
            (d.cpu_milli, d.memory_bytes, d.num_gpus, d.gpu_milli, d.gpu_model, w)
            for d, w in _normalised(mix)
        ]
        self._frag: dict[tuple[object, ...], float] = {}

    # ---- what the library computes, on (cpu, mem, gpu frees) ----
    def frag(self, cpu: int, mem: int, gpus: Sequence[int], model: str | None) -> float:
        key = (cpu, mem, tuple(sorted(gpus)), model)
        found = self._frag.get(key)
        if found is not None:
            return found
        free = sum(gpus)
        total = 0.0
        for d_cpu, d_mem, num, milli, d_model, weight in self.mix:
            hostable = cpu >= d_cpu and mem >= d_mem and num > 0
            if hostable and d_model is not None and model != d_model:
                hostable = False
            if hostable:
                usable = sum(1 for g in gpus if g >= milli)
                hostable = usable >= (1 if num == 1 and milli < FULL_GPU else num)
            lost = sum(g for g in gpus if g < milli) if hostable else free
            total += weight * lost
        self._frag[key] = total
        return total

    def choices(self, i: int, pod: Pod) -> list[tuple[int, ...]]:
        d = pod.demand
        if self.cpu[i] < d.cpu_milli or self.mem[i] < d.memory_bytes:
            return []
        if d.num_gpus == 0:
            return [()]
        if pod.models is not None and self.model[i] not in pod.models:
            return []
        usable = [j for j, g in enumerate(self.gpus[i]) if g >= d.gpu_milli]
        if d.shares_gpu:
            return [(j,) for j in usable]
        return [tuple(usable[: d.num_gpus])] if len(usable) >= d.num_gpus else []

    def pick(self, policy: str, pod: Pod) -> tuple[int, tuple[int, ...]] | None:
        d = pod.demand
        need = d.gpu_milli if d.num_gpus else 0
        best: tuple[object, ...] | None = None
        found: tuple[int, tuple[int, ...]] | None = None
        for i in range(len(self.names)):  # keys end with the node's name: order only matters to first-fit
            gpus = self.gpus[i]
            if self.cpu[i] < d.cpu_milli or self.mem[i] < d.memory_bytes:
                continue
            if need and (not gpus or max(gpus) < need):
                continue
            options = self.choices(i, pod)
            if not options:
                continue
            if policy == "first-fit":
                return i, options[0]
            cpu_after, mem_after = self.cpu[i] - d.cpu_milli, self.mem[i] - d.memory_bytes
            shares = _frac(cpu_after, self.cpu_total[i]) + _frac(mem_after, self.mem_total[i])
            gpu_left = sum(gpus) - len(options[0]) * d.gpu_milli
            before = self.frag(self.cpu[i], self.mem[i], gpus, self.model[i]) if policy == "fgd" else 0.0
            seen: set[int] = set()
            for option in options:
                chosen = sum(gpus[j] - d.gpu_milli for j in option)
                if d.shares_gpu:  # GPUs with the same free share give the same key but for their index
                    if gpus[option[0]] in seen:
                        continue
                    seen.add(gpus[option[0]])
                key: tuple[object, ...]
                if policy == "best-fit":
                    key = (gpu_left, shares, chosen, self.names[i], option)
                elif policy == "spread":
                    gpu_share = gpu_left / (FULL_GPU * len(gpus)) if gpus else 0.0
                    key = (-(gpu_share + shares), -chosen, self.names[i], option)
                else:
                    after = [g - d.gpu_milli if j in option else g for j, g in enumerate(gpus)]
                    growth = self.frag(cpu_after, mem_after, after, self.model[i]) - before
                    key = (round(growth, 6), gpu_left, shares, chosen, self.names[i], option)
                if best is None or key < best:
                    best, found = key, (i, option)
        return found

    def place(self, i: int, option: tuple[int, ...], demand: Demand) -> None:
        self.cpu[i] -= demand.cpu_milli
        self.mem[i] -= demand.memory_bytes
        for j in option:
            self.gpus[i][j] -= demand.gpu_milli

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(
            tuple(
                NodeState(
                    self.names[i],
                    self.cpu[i],
                    self.mem[i],
                    tuple(GPUState(j, g) for j, g in enumerate(self.gpus[i])),
                    self.cpu_total[i],
                    self.mem_total[i],
                    self.model[i],
                )
                for i in range(len(self.names))
            )
        )


def _frac(free: int, total: int) -> float:
    return free / total if total > 0 else 0.0


def library_policy(name: str, mix: Sequence[tuple[Demand, float]]) -> PlacementPolicy | None:
    if name == "best-fit":
        return best_fit
    if name == "spread":
        return spread
    if name == "fgd":
        return fragmentation_aware(mix)
    return None


def inflate(
    nodes: Sequence[NodeState],
    pods: Sequence[Pod],
    policy: str,
    seed: int,
    check: int = 0,
    weighting: str = "gpu",
) -> dict[str, Any]:
    """One inflation run: draw pods with replacement until the requested GPUs reach the capacity."""
    mix = workload_mix(pods, weighting)
    cluster = Cluster(nodes, mix if policy == "fgd" else ())
    reference = library_policy(policy, mix) if check else None
    snapshot = cluster.snapshot() if reference is not None else None
    capacity = FULL_GPU * sum(len(g) for g in cluster.gpus)
    rng = random.Random(seed)
    requested = allocated = drawn = unplaced = unplaced_gpu = 0
    started = time.perf_counter()
    while requested < capacity:
        pod = pods[rng.randrange(len(pods))]
        d = pod.demand
        gpu = d.num_gpus * d.gpu_milli
        requested += gpu
        drawn += 1
        found = cluster.pick(policy, pod)
        if reference is not None and snapshot is not None and drawn <= check:
            want = reference(snapshot, d)
            got = None if found is None else Placement(cluster.names[found[0]], found[1], d)
            if want != got:
                raise AssertionError(f"{policy}, pod {drawn}: the bench placed {got}, the library {want}")
            if want is not None:
                snapshot = apply(snapshot, want)
        if found is None:
            unplaced += 1
            unplaced_gpu += gpu
            continue
        cluster.place(found[0], found[1], d)
        allocated += gpu
    gpus = sum(len(g) for g in cluster.gpus)
    return {
        "policy": policy,
        "seed": seed,
        "mix": weighting if policy == "fgd" else None,
        "allocated_share": allocated / capacity if capacity else 0.0,
        "idle_gpus": sum(1 for g in cluster.gpus for m in g if m == FULL_GPU),
        "unplaced_pods": unplaced,
        "unplaced_gpu_milli": unplaced_gpu,
        "pods_drawn": drawn,
        "gpus": gpus,
        "seconds": time.perf_counter() - started,
    }


def average(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "policy": runs[0]["policy"],
        "mix": runs[0]["mix"],
        "seeds": [r["seed"] for r in runs],
    }
    for field in (
        "allocated_share",
        "idle_gpus",
        "unplaced_pods",
        "unplaced_gpu_milli",
        "pods_drawn",
        "seconds",
    ):
        values = [float(r[field]) for r in runs]
        out[field] = sum(values) / len(values)
    out["allocated_share_min"] = min(float(r["allocated_share"]) for r in runs)
    out["allocated_share_max"] = max(float(r["allocated_share"]) for r in runs)
    out["gpus"] = runs[0]["gpus"]
    return out


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pods", nargs="?", type=Path, default=TRACE / "openb_pod_list_default.csv")
    parser.add_argument("--nodes", default="gpu", help="gpu (GPU nodes), all (all nodes) or a node list CSV")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="seeds seed..seed+R-1, averaged")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--mix", choices=MIXES, default="gpu", help="FGD's workload mix: shapes by share of GPUs or of pods"
    )
    parser.add_argument("--check", type=int, default=0, help="compare the first N picks with the library")
    parser.add_argument("--json", action="store_true", help="one object per policy, a JSON list on stdout")
    args = parser.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or args.repeats < 1:
        parser.error(f"policies: choose from {', '.join(POLICIES)}; --repeats 1 or more")
    node_path = {"gpu": TRACE / "openb_node_list_gpu_node.csv", "all": TRACE / "openb_node_list_all_node.csv"}
    nodes = load_nodes(node_path.get(args.nodes, Path(args.nodes)))
    pods = load_pods(args.pods)
    if not pods or not any(n.gpus for n in nodes):
        parser.error("the pod list is empty or the node list has no GPUs")
    results = []
    for policy in policies:
        runs = [
            inflate(nodes, pods, policy, args.seed + r, args.check, args.mix) for r in range(args.repeats)
        ]
        results.append(average(runs))
        if not args.json:
            print(f"  {policy}: {runs[-1]['seconds']:.1f}s per run", file=sys.stderr)
    if args.json:
        log(json.dumps(results, indent=1))
        return 0
    gpus = sum(len(n.gpus) for n in nodes)
    log(
        f"{args.pods.name}: {len(pods)} pods; {len(nodes)} nodes, {gpus} GPUs; seeds {args.seed}.."
        f"{args.seed + args.repeats - 1}"
    )
    log(
        f"{'policy':<10} {'allocated':>9} {'min':>7} {'max':>7} {'idle GPUs':>9} {'unplaced':>9} {'drawn':>7}"
    )
    for r in results:
        log(
            f"{r['policy']:<10} {r['allocated_share']:>9.2%} {r['allocated_share_min']:>7.2%} "
            f"{r['allocated_share_max']:>7.2%} {r['idle_gpus']:>9.1f} {r['unplaced_pods']:>9.1f} "
            f"{r['pods_drawn']:>7.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
