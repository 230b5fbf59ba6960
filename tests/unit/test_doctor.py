"""The doctor's rules, table-tested on frozen inputs (no stack): the layer named, its evidence, the action."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from lamina.observability import (
    BudgetState,
    DatasetState,
    DeploymentState,
    DeviceSample,
    DeviceState,
    DoctorInputs,
    DriftState,
    TraceLine,
    diagnose,
)
from lamina.observability._doctor import p95

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def line(layers: dict[str, float], stages: dict[str, float] | None = None, *, status: int = 200) -> TraceLine:
    return TraceLine(
        trace_id="0" * 32,
        start=T0,
        duration_ms=sum(layers.values()),
        route="/v1/chat/completions",
        model="chat",
        status=status,
        error=status >= 500,
        layers_ms=layers,
        bottleneck=max(layers, key=lambda k: layers[k]),
        stages_ms=stages or {},
    )


SATURATED = [line({"application": 2, "orchestration": 900, "models": 400}, {"queue": 900, "engine": 400})] * 5
SLOW_DATA = [line({"application": 2, "data": 700, "models": 100}, {"retrieve": 700, "engine": 100})] * 5
SLOW_GUARDS = [line({"application": 600, "models": 100}, {"engine": 100})] * 5
ONE_BUSY = DeploymentState("chat", ready=1, desired=1, in_flight=4)
TWO_BUSY = DeploymentState("chat", ready=2, desired=2, in_flight=6)


def inputs(traces: list[TraceLine], **kw: object) -> DoctorInputs:
    return DoctorInputs(window="15m", traces=traces, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "expected_layer", "evidence", "action"),
    [
        (
            inputs(SATURATED, deployments=[TWO_BUSY]),
            "orchestration",
            "both replicas busy",
            "add a replica to chat",
        ),
        (
            inputs(SATURATED, deployments=[ONE_BUSY]),
            "orchestration",
            "its one replica busy",
            "replicas: 1 -> 2",
        ),
        (
            inputs(SATURATED, deployments=[TWO_BUSY], device=DeviceState(cpu_percent=97.0)),
            "orchestration",
            "compute: CPU 97%",
            "the CPU is saturated",
        ),
        (
            inputs(SATURATED, deployments=[TWO_BUSY], device=DeviceState(cpu_percent=40.0, gpus=1)),
            "orchestration",
            "queue wait p95 900 ms",
            "move chat to a GPU",
        ),
        (inputs(SLOW_DATA), "data", "retrieval p95 700 ms", "retrieve fewer passages"),
        (
            inputs(SLOW_DATA, datasets=[DatasetState("docs", True, "5000 chunks searched without a graph")]),
            "data",
            "docs's search index is stale",
            "rebuild the search index of docs",
        ),
        (
            inputs(SLOW_GUARDS, guards=["pii", "slow"]),
            "application",
            "input guards configured: pii, slow",
            "relax",
        ),
        (inputs(SLOW_GUARDS), "application", "gateway self time p95 600 ms", "profile the gateway"),
    ],
)
def test_the_bottleneck_layer_its_evidence_and_the_next_action(
    case: DoctorInputs, expected_layer: str, evidence: str, action: str
) -> None:
    verdict = diagnose(case)
    assert verdict.bottleneck == expected_layer
    assert any(evidence in e for e in verdict.evidence), verdict.evidence
    assert any(action in a for a in verdict.actions), verdict.actions
    assert verdict.requests == 5


def test_models_is_named_when_the_queue_wait_is_a_models_span() -> None:
    traces = [
        line({"application": 1, "orchestration": 5, "models": 1200}, {"queue": 800, "engine": 1200})
    ] * 4
    verdict = diagnose(inputs(traces, deployments=[TWO_BUSY]))
    assert verdict.bottleneck == "models"
    assert verdict.evidence[0].startswith("models: 100% of the time of 4 requests")
    assert "turn on the response cache (cache.enabled: true) if requests repeat" in verdict.actions


def test_the_cache_is_not_suggested_when_it_is_on() -> None:
    verdict = diagnose(inputs(SATURATED, deployments=[TWO_BUSY], cache_enabled=True))
    assert not any("cache" in a for a in verdict.actions)


def test_too_few_traces_name_no_bottleneck_but_still_report_problems() -> None:
    verdict = diagnose(inputs(SATURATED[:2], deployments=[DeploymentState("chat", ready=0, desired=1)]))
    assert verdict.bottleneck is None
    assert "too few to name a bottleneck" in verdict.evidence[0]
    assert [p.what for p in verdict.problems] == ["chat: 0/1 replicas ready"]


@pytest.mark.parametrize(
    ("case", "layer", "what"),
    [
        (
            inputs([], deployments=[DeploymentState("chat", ready=1, desired=2)]),
            "orchestration",
            "1/2 replicas",
        ),
        (
            inputs([], datasets=[DatasetState("docs", True, "stale graph")]),
            "data",
            "docs: search index stale",
        ),
        (
            inputs([], drift=[DriftState("docs", True, "PSI 0.4 > 0.2")]),
            "data",
            "docs: drift (PSI 0.4 > 0.2)",
        ),
        (inputs([], budgets=[BudgetState("global", 9.5, 10.0)]), "application", "9.50 of 10.00 USD"),
        (inputs([line({"application": 1}, status=500)] * 3), "application", "3 of 3 requests failed"),
    ],
)
def test_what_is_broken(case: DoctorInputs, layer: str, what: str) -> None:
    problems = diagnose(case).problems
    assert len(problems) == 1
    assert problems[0].layer == layer and what in problems[0].what
    assert problems[0].action


@pytest.mark.parametrize(
    "case",
    [
        inputs([], deployments=[DeploymentState("chat", ready=2, desired=2)]),
        inputs([], datasets=[DatasetState("docs", False)]),
        inputs([], drift=[DriftState("docs", False)]),
        inputs([], budgets=[BudgetState("global", 5.0, 10.0)]),
        inputs([line({"application": 1})] * 30 + [line({"application": 1}, status=500)]),
    ],
)
def test_healthy_parts_are_not_reported(case: DoctorInputs) -> None:
    assert diagnose(case).problems == []


def test_p95_is_the_nearest_rank() -> None:
    assert p95([]) == 0.0
    assert p95([5.0]) == 5.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([float(i) for i in range(1, 21)]) == 19.0


def test_the_verdict_is_json() -> None:
    body = diagnose(inputs(SLOW_DATA)).to_json()
    assert body["bottleneck"] == "data" and body["requests"] == 5
    assert body["layers_ms"] == {"application": 10.0, "data": 3500.0, "models": 500.0}
    assert body["share"] == pytest.approx(3500 / 4010, abs=1e-3)


def _period(start_s: float, end_s: float, cpu: float | None, gpu: float | None = None) -> DeviceSample:
    t0 = T0.timestamp()
    return DeviceSample(t0 + start_s, t0 + end_s, cpu, gpu)


def test_the_cpu_quoted_is_that_of_the_periods_in_which_the_requests_ran() -> None:
    # three saturated requests from 100 s to 103.3 s; the CPU has been idle since
    traces = [replace(SATURATED[0], start=T0 + timedelta(seconds=s)) for s in (100, 101, 102)]
    history = [_period(85, 100, 4.0), _period(100, 115, 97.0), _period(115, 130, 2.0)]
    idle_now = DeviceState(cpu_percent=3.0)
    verdict = diagnose(inputs(traces, deployments=[TWO_BUSY], device=idle_now, history=history))
    assert "compute: CPU 97% while the requests ran" in verdict.evidence, verdict.evidence
    assert any("the CPU is saturated" in a for a in verdict.actions)
    assert not any("add a replica" in a for a in verdict.actions)
    # no period of the history covers them (a store from before a restart): the CPU now, said to be so
    verdict = diagnose(inputs(traces, deployments=[TWO_BUSY], device=idle_now, history=history[:1]))
    assert "compute: CPU 3% now" in verdict.evidence, verdict.evidence
    assert any("add a replica to chat" in a for a in verdict.actions)


def test_periods_weigh_by_the_time_requests_ran_in_them() -> None:
    # one request from 114 s to 118 s: 1 s of it in a period at 96%, 3 s in one at 40% (GPUs 80% and unread)
    slow = line(
        {"application": 10, "orchestration": 2_990, "models": 1_000}, {"queue": 2_990, "engine": 1_000}
    )
    traces = [replace(slow, start=T0 + timedelta(seconds=114))] * 3
    history = [_period(100, 115, 96.0, 80.0), _period(115, 130, 40.0, None), _period(130, 131, 100.0, 5.0)]
    verdict = diagnose(inputs(traces, deployments=[ONE_BUSY], history=history))
    assert "compute: CPU 54% while the requests ran, peak 96%" in verdict.evidence, verdict.evidence
    assert "compute: GPU 80% while the requests ran" in verdict.evidence


def test_refused_requests_are_not_failures_of_the_stack() -> None:
    refused = replace(line({"application": 1}), status=400, error=True)  # the root span is marked ERROR
    verdict = diagnose(inputs([refused] * 19 + [line({"application": 1})] * 10))
    assert [p.what for p in verdict.problems] == ["19 of 29 requests were refused in the last 15m (19 x 400)"]
    mixed = [refused] * 2 + [replace(refused, status=429)] * 3 + [line({"application": 1})] * 20
    assert [p.what for p in diagnose(inputs(mixed)).problems] == []  # 5 of 25: below the share reported
    failing = [replace(refused, status=0)] * 3  # an error with no answer sent: the stack's
    assert diagnose(inputs(failing)).problems[0].what == "3 of 3 requests failed in the last 15m"


def test_asked_just_after_a_sample_the_cpu_now_is_that_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within a quarter second of the device sampler's reading the CPU counters say nothing yet: the
    doctor takes the sample's own period as "now" instead of blocking half a second to read again."""
    from types import SimpleNamespace

    from lamina.compute._telemetry import CpuReading
    from lamina.config import LaminaConfig
    from lamina.stack import _doctor

    def no_wait(*_: object, **__: object) -> float:
        raise AssertionError("the doctor read the CPU again")

    monkeypatch.setattr(_doctor, "CpuMeter", no_wait)
    sample = DeviceSample(100.0, 101.0, 42.0, None)
    stack = SimpleNamespace(
        config=LaminaConfig(),
        store=None,
        cpu=SimpleNamespace(read=lambda advance: CpuReading(101.0, 101.1, None)),
        telemetry=SimpleNamespace(devices=SimpleNamespace(history=[sample])),
    )
    inputs = _doctor._inputs_of(stack, "15m")  # type: ignore[arg-type]
    assert inputs.device.cpu_percent == 42.0
    assert inputs.history[0] == sample


def test_a_busy_cpu_deployment_of_unbatched_weights_is_told_to_quantize_them_to_q8_0() -> None:
    q4_1 = replace(ONE_BUSY, model="chat-model@3", weights="MOSTLY_Q4_1")
    verdict = diagnose(inputs(SATURATED, deployments=[q4_1]))
    (action,) = [a for a in verdict.actions if "Q8_0" in a]
    assert action.startswith("quantize chat's Q4_1 weights to Q8_0"), action
    assert "`lamina models quantize chat-model@3 --method gguf-q8_0`" in action
    assert any("add a replica to chat" in a for a in verdict.actions)  # beside, not instead
    saturated = diagnose(inputs(SATURATED, deployments=[q4_1], device=DeviceState(cpu_percent=97.0)))
    assert any("Q8_0" in a for a in saturated.actions), saturated.actions
    # weights llama.cpp batches, a replica on a GPU, a deployment not short of anything: no such advice
    for deployment in (
        replace(q4_1, weights="MOSTLY_Q8_0"),
        replace(q4_1, weights=None, model=None),
        replace(q4_1, gpus=1),
    ):
        assert not any("Q8_0" in a for a in diagnose(inputs(SATURATED, deployments=[deployment])).actions)
    idle = replace(q4_1, ready=2, desired=2, in_flight=0)
    calm = [line({"application": 5, "models": 900}, {"queue": 1, "engine": 900})] * 5
    assert not any("Q8_0" in a for a in diagnose(inputs(calm, deployments=[idle])).actions)


def test_a_replica_is_busy_only_with_all_its_slots_taken() -> None:
    # two calls in flight on one replica that decodes four at once (a GGUF engine's parallel slots), and
    # no queue wait: nothing is short of replicas
    calm = [line({"application": 5, "models": 900}, {"queue": 1, "engine": 900})] * 5
    four = DeploymentState("chat", ready=1, desired=1, in_flight=2, slots=4)
    verdict = diagnose(inputs(calm, deployments=[four]))
    assert not any("busy" in e for e in verdict.evidence), verdict.evidence
    assert not any("add a replica" in a for a in verdict.actions), verdict.actions
    full = diagnose(inputs(calm, deployments=[replace(four, in_flight=4)]))
    assert any("its one replica busy (4 in flight)" in e for e in full.evidence), full.evidence
    assert any("add a replica to chat" in a for a in full.actions), full.actions
