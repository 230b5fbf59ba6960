"""The doctor: which layer to look at now, why, what to do next, and what is broken.

:func:`diagnose` is a pure function of a frozen :class:`DoctorInputs` (the composition root gathers them:
the traces of a window, the deployments' replicas and in-flight calls, the machine's CPU and GPUs, the
datasets' indexes, the newest drift reports, the budgets), so every rule is table-tested without a stack.

The bottleneck is the layer with the most *self time* summed over the window's traces (a span's time less
its children's, see ``_trace_views``): the layer where requests actually spent their time, not the layer
whose spans merely enclose others. Evidence quotes the numbers behind it (p95 of the step, replicas busy,
CPU %); the action is the first rule that matches, most specific first. Rejected: naming the layer with
the highest p95 alone, which a handful of slow outliers decide.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lamina.observability._trace_views import TraceLine
from lamina.observability._utilisation import DeviceSample, DeviceState, Utilisation, utilisation

#: fewer traces than this in the window: no bottleneck is named (too little to go on)
MIN_TRACES = 3
#: CPU or GPU utilisation (%) from which a device counts as saturated
SATURATED_PCT = 90.0
#: a budget this much spent (fraction) is reported
BUDGET_WARN = 0.9
#: share of failed requests in the window that is reported
ERROR_RATE_WARN = 0.05
#: share of refused requests (4xx) in the window that is reported
REFUSED_RATE_WARN = 0.25
#: queue wait (share of the request's time, p95) from which a deployment counts as short of replicas
QUEUE_SHARE = 0.25
#: GGUF weight types (llama.cpp's names) that its CPU build multiplies a token at a time: no llamafile
#: sgemm kernel and no repacked layout, so a replica decoding several requests at once gains little (the
#: bundled SmolLM2, Q4_1, 1.5x at 8 sequences; its Q8_0 variant 1.9x: README, "Concurrent streams")
UNBATCHED_WEIGHTS = {"MOSTLY_Q4_1": "Q4_1", "MOSTLY_Q5_1": "Q5_1"}


@dataclass(frozen=True)
class DeploymentState:
    name: str
    ready: int
    desired: int
    #: calls in flight at the gateway now
    in_flight: int = 0
    #: calls one replica runs at once (its engine's parallel slots); None: unknown (taken as 1)
    slots: int | None = None
    gpus: int = 0
    #: the registered ``NAME@VERSION`` it serves (None: an engine without a model file)
    model: str | None = None
    #: its GGUF file's weight type, as llama.cpp names it (``MOSTLY_Q4_1``); None for other formats
    weights: str | None = None


@dataclass(frozen=True)
class DatasetState:
    name: str
    #: its search index is missing or older than its vectors (searches scan every row)
    stale: bool
    detail: str = ""


@dataclass(frozen=True)
class DriftState:
    dataset: str
    drifted: bool
    explanation: str = ""


@dataclass(frozen=True)
class BudgetState:
    scope: str
    spent_usd: float
    limit_usd: float


@dataclass(frozen=True)
class DoctorInputs:
    #: a duration back from now (``15m``) or an ISO moment (``2026-01-31T12:00:00Z``): see :func:`period_of`
    window: str
    traces: Sequence[TraceLine] = ()
    deployments: Sequence[DeploymentState] = ()
    device: DeviceState = field(default_factory=DeviceState)
    #: the device sample periods, oldest first (what the doctor reads the window's utilisation from)
    history: Sequence[DeviceSample] = ()
    datasets: Sequence[DatasetState] = ()
    drift: Sequence[DriftState] = ()
    budgets: Sequence[BudgetState] = ()
    cache_enabled: bool = False
    #: names of the configured input guards
    guards: Sequence[str] = ()


@dataclass(frozen=True)
class Finding:
    """Something broken or about to be, with what to do about it."""

    layer: str
    what: str
    action: str

    def to_json(self) -> dict[str, str]:
        return {"layer": self.layer, "what": self.what, "action": self.action}


@dataclass(frozen=True)
class Verdict:
    window: str
    requests: int
    #: None: too little traffic in the window to name one
    bottleneck: str | None
    #: the bottleneck's share of all self time in the window
    share: float
    layers_ms: dict[str, float]
    evidence: list[str]
    actions: list[str]
    problems: list[Finding]

    def to_json(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "requests": self.requests,
            "bottleneck": self.bottleneck,
            "share": round(self.share, 3),
            "layers_ms": {k: round(v, 1) for k, v in sorted(self.layers_ms.items())},
            "evidence": self.evidence,
            "actions": self.actions,
            "problems": [p.to_json() for p in self.problems],
        }


def p95(values: Sequence[float]) -> float:
    """The 95th percentile (nearest rank); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _seconds(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


def _stage_p95(traces: Sequence[TraceLine], stage: str) -> float:
    return p95([t.stages_ms[stage] for t in traces if stage in t.stages_ms])


def _busy(d: DeploymentState) -> bool:
    return d.ready > 0 and d.in_flight >= d.ready * (d.slots or 1)


def _replica_words(d: DeploymentState) -> str:
    """How busy ``d``'s replicas are (said of a busy deployment)."""
    if d.ready == 1:
        return f"{d.name}: its one replica busy ({d.in_flight} in flight)"
    both = "both" if d.ready == 2 else f"all {d.ready}"
    return f"{d.name}: {both} replicas busy ({d.in_flight} in flight)"


def _compute_evidence(cpu: Utilisation | None, gpu: Utilisation | None) -> list[str]:
    return [u.words(device) for device, u in (("CPU", cpu), ("GPU", gpu)) if u is not None]


def _serving(inputs: DoctorInputs, layer: str) -> tuple[list[str], list[str]]:
    """Evidence and actions when models (or orchestration: waiting for a replica) is the bottleneck."""
    traces, device = inputs.traces, inputs.device
    queue, engine = _stage_p95(traces, "queue"), _stage_p95(traces, "engine")
    total = p95([t.duration_ms for t in traces]) or 1.0
    evidence = [f"{layer}: queue wait p95 {_seconds(queue)}, engine p95 {_seconds(engine)} after it"]
    busiest = max(
        inputs.deployments, key=lambda d: d.in_flight / max(1, d.ready * (d.slots or 1)), default=None
    )
    if busiest is not None and _busy(busiest):
        evidence.append(f"{layer}: {_replica_words(busiest)}")
    cpu, gpu = utilisation(traces, inputs.history, device)
    evidence += _compute_evidence(cpu, gpu)
    cpu_full = cpu is not None and cpu.percent >= SATURATED_PCT
    queued = queue >= QUEUE_SHARE * total or (busiest is not None and _busy(busiest))
    name = busiest.name if busiest is not None else "the deployment"
    actions = []
    if device.gpus and (busiest is None or not busiest.gpus):
        actions.append(f"move {name} to a GPU (this machine has {device.gpus}): its engine runs on the CPU")
    if queued and not cpu_full:
        replicas = busiest.desired if busiest is not None else 1
        actions.append(
            f"add a replica to {name} (replicas: {replicas} -> {replicas + 1}): calls wait in queue"
        )
    if cpu_full:
        actions.append("the CPU is saturated: another replica on this machine will not help; add a machine")
    if busiest is not None and (queued or cpu_full):
        actions += _weights_action(busiest)
    if not inputs.cache_enabled:
        actions.append("turn on the response cache (cache.enabled: true) if requests repeat")
    if not actions:
        actions.append(f"use a smaller or quantized model for {name}: its engine time dominates")
    return evidence, actions


def _weights_action(d: DeploymentState) -> list[str]:
    """A busy deployment on the CPU whose weights llama.cpp does not batch: their Q8_0 variant."""
    short = UNBATCHED_WEIGHTS.get(d.weights or "")
    if short is None or d.gpus:
        return []
    ref = d.model or d.name
    return [
        f"quantize {d.name}'s {short} weights to Q8_0 (`lamina models quantize {ref} --method gguf-q8_0`, "
        f"checked by the accuracy gate) and deploy that version: on a CPU llama.cpp multiplies {short} "
        "weights a token at a time, so a replica gains little from decoding requests together"
    ]


def _data(inputs: DoctorInputs) -> tuple[list[str], list[str]]:
    evidence = [f"data: retrieval p95 {_seconds(_stage_p95(inputs.traces, 'retrieve'))}"]
    stale = [d for d in inputs.datasets if d.stale]
    actions = [
        f"rebuild the search index of {d.name} (`lamina data gc {d.name} --keep N` re-indexes it)"
        for d in stale
    ]
    evidence += [f"data: {d.name}'s search index is stale ({d.detail})" for d in stale]
    actions.append("retrieve fewer passages (rag k), or search in vector or keyword mode instead of hybrid")
    actions.append("check the vector store's health and latency (a remote pgvector/Qdrant: its network)")
    return evidence, actions


def _application(inputs: DoctorInputs, self_p95: float) -> tuple[list[str], list[str]]:
    evidence = [f"application: gateway self time p95 {_seconds(self_p95)}"]
    guards = _stage_p95(inputs.traces, "guards")
    if guards:
        evidence.append(f"application: guards p95 {_seconds(guards)}")
    if inputs.guards:
        names = ", ".join(inputs.guards)
        evidence.append(f"application: input guards configured: {names}")
        actions = [
            f"relax the input guards ({names}): drop or lower the timeout_ms of the slowest, or exempt "
            "trusted keys (exempt_keys)"
        ]
    else:
        actions = ["profile the gateway: templates, key lookups, rate limits and budgets run here"]
    return evidence, actions


def _problems(inputs: DoctorInputs) -> list[Finding]:
    out = [
        Finding(
            "orchestration",
            f"{d.name}: {d.ready}/{d.desired} replicas ready",
            "read the replica's log in the state directory's logs/ folder; the controller restarts it",
        )
        for d in inputs.deployments
        if d.ready < d.desired
    ]
    out += [
        Finding(
            "data",
            f"{d.name}: search index stale ({d.detail})",
            f"rebuild it: `lamina data gc {d.name} --keep N` re-indexes it",
        )
        for d in inputs.datasets
        if d.stale
    ]
    out += [
        Finding(
            "data", f"{d.dataset}: drift ({d.explanation})", "re-ingest the dataset or review its sources"
        )
        for d in inputs.drift
        if d.drifted
    ]
    out += [
        Finding(
            "application",
            f"budget {b.scope}: {b.spent_usd:.2f} of {b.limit_usd:.2f} USD spent",
            "raise the budget (costs.budgets) or expect 429s when it is spent",
        )
        for b in inputs.budgets
        if b.limit_usd > 0 and b.spent_usd >= BUDGET_WARN * b.limit_usd
    ]
    return out + _failures(inputs.traces, inputs.window)


def _failures(traces: Sequence[TraceLine], window: str) -> list[Finding]:
    """Requests the stack failed (5xx, or an error with no status of the client's), and apart from them
    requests it refused (4xx: the client's request, a key, a limit) when they are a large share."""
    refused = Counter(t.status for t in traces if 400 <= t.status < 500)
    failed = sum(t.status >= 500 or (t.error and not 400 <= t.status < 500) for t in traces)
    out = []
    if traces and failed / len(traces) >= ERROR_RATE_WARN:
        out.append(
            Finding(
                "application",
                f"{failed} of {len(traces)} requests failed {period_of(window)}",
                "open one with `lamina trace ID` (`lamina traces` lists them)",
            )
        )
    if traces and refused.total() / len(traces) >= REFUSED_RATE_WARN:
        codes = ", ".join(f"{n} x {status}" for status, n in sorted(refused.items()))
        out.append(
            Finding(
                "application",
                f"{refused.total()} of {len(traces)} requests were refused {period_of(window)} ({codes})",
                "the clients' requests, keys or limits: each error body says what to change; "
                "`lamina traces` lists them",
            )
        )
    return out


def period_of(window: str) -> str:
    """``in the last 15m`` for a duration, ``since 2026-01-31T12:00:00Z`` for a moment (a date has a dash)."""
    return f"since {window}" if "-" in window else f"in the last {window}"


def diagnose(inputs: DoctorInputs) -> Verdict:
    """The verdict over ``inputs`` (see the module doc)."""
    traces = inputs.traces
    totals: dict[str, float] = {}
    for t in traces:
        for layer, ms in t.layers_ms.items():
            totals[layer] = totals.get(layer, 0.0) + ms
    problems = _problems(inputs)
    everything = sum(totals.values())
    if len(traces) < MIN_TRACES or everything <= 0:
        return Verdict(
            inputs.window,
            len(traces),
            None,
            0.0,
            totals,
            [f"{len(traces)} traced request(s) {period_of(inputs.window)}: too few to name a bottleneck"],
            ["send some traffic (or widen --window) and ask again"],
            problems,
        )
    layer = max(sorted(totals), key=lambda k: totals[k])
    if layer in ("models", "orchestration", "compute"):
        evidence, actions = _serving(inputs, layer)
    elif layer == "data":
        evidence, actions = _data(inputs)
    else:
        evidence, actions = _application(inputs, p95([t.layers_ms.get(layer, 0.0) for t in traces]))
    share = totals[layer] / everything
    evidence.insert(
        0, f"{layer}: {share:.0%} of the time of {len(traces)} requests {period_of(inputs.window)}"
    )
    return Verdict(inputs.window, len(traces), layer, share, totals, evidence, actions, problems)
