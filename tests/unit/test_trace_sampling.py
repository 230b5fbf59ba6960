"""Which traces are kept (tail-aware sampling), where a request's time went (the per-layer breakdown), and
the bounded trace store: the keeper writes kept traces only, retention deletes beyond age, count and bytes."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode
from sqlalchemy import func, insert, select

from lamina.observability import (
    LAYER,
    LAYERS,
    Kept,
    Layer,
    RetentionPolicy,
    SamplingPolicy,
    Telemetry,
    TraceRetention,
    TraceSampler,
    list_traces,
    parse_header,
    read_summary,
    read_trace,
)
from lamina.observability._breakdown import Breakdown, Timed, breakdown
from lamina.observability._keeper import TraceKeeper
from lamina.observability._light import LightSpan, LightTracer
from lamina.observability._open_trace import OpenTrace
from lamina.observability._store_exporter import SpanWriter
from lamina.store import Store, replay_requests, spans, traces

MS = 1_000_000  # nanoseconds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_errors_and_slow_traces_are_always_kept() -> None:
    sampler = TraceSampler(SamplingPolicy(rate=0.0, per_s=0.0, slow_ms=500))
    assert sampler.decide(error=True, duration_ms=1) is Kept.ERROR
    assert sampler.decide(error=False, duration_ms=500) is Kept.SLOW
    assert sampler.decide(error=False, duration_ms=499.9) is None


def test_client_errors_are_kept_within_their_own_cap() -> None:
    clock = Clock()
    sampler = TraceSampler(SamplingPolicy(rate=0.0, per_s=0.0), clock=clock)  # cap: 10 a second
    refused = [sampler.decide(error=False, duration_ms=1, client_error=True) for _ in range(150)]
    assert refused.count(Kept.ERROR) == 100 and refused.count(None) == 50  # ten seconds' worth
    clock.now += 1.0
    assert (
        sum(sampler.decide(error=False, duration_ms=1, client_error=True) is Kept.ERROR for _ in range(50))
        == 10
    )
    assert sampler.decide(error=True, duration_ms=1) is Kept.ERROR  # a failure of the stack: always


def test_the_rate_keeps_that_share_of_ordinary_traces() -> None:
    draws = itertools.cycle([0.05, 0.25, 0.5, 0.95])  # below 0.2: kept
    sampler = TraceSampler(SamplingPolicy(rate=0.2, per_s=1e9), rng=lambda: next(draws))
    kept = [sampler.decide(error=False, duration_ms=1) for _ in range(400)]
    assert kept.count(Kept.SAMPLED) == 100 and kept.count(None) == 300


def test_the_per_second_cap_lets_a_burst_through_then_a_steady_trickle() -> None:
    clock = Clock()
    sampler = TraceSampler(SamplingPolicy(rate=1.0, per_s=2.0), clock=clock)
    burst = [sampler.decide(error=False, duration_ms=1) for _ in range(50)]
    assert burst.count(Kept.SAMPLED) == 20  # ten seconds' worth
    kept = 0
    for _ in range(1000):  # 100 requests a second for 10 s: 2 a second kept
        clock.now += 0.01
        kept += sampler.decide(error=False, duration_ms=1) is Kept.SAMPLED
    assert 19 <= kept <= 20  # float steps may leave the last token just short
    clock.now += 1000
    assert sum(sampler.decide(error=False, duration_ms=1) is Kept.SAMPLED for _ in range(30)) == 20


def test_a_bad_policy_says_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="within 0 and 1"):
        SamplingPolicy(rate=1.5)
    with pytest.raises(ValueError, match="slow_ms"):
        SamplingPolicy(slow_ms=0)


def test_the_breakdown_counts_each_layers_self_time() -> None:
    # root 0-100 ms (application); route 1-3 (models); retrieve 3-13 (data, a child without a layer
    # inherits it); dispatch 15-95 (orchestration) holding engine 20-90 (models) holding a device span
    # (compute, zero length), and a child running past its parent's end (clipped)
    spans_ = [
        Timed(1, None, "application", 0, 100 * MS),
        Timed(2, 1, "models", 1 * MS, 3 * MS),
        Timed(3, 1, "data", 3 * MS, 13 * MS),
        Timed(4, 3, None, 5 * MS, 8 * MS),
        Timed(5, 1, "orchestration", 15 * MS, 95 * MS),
        Timed(6, 5, "models", 20 * MS, 99 * MS),
        Timed(7, 6, "compute", 20 * MS, 20 * MS),
    ]
    result = breakdown(spans_, 1, now_ns=10**12)
    assert result.layers == {
        "application": 8.0,
        "data": 10.0,
        "models": 77.0,
        "orchestration": 5.0,
        "compute": 0,
    }
    assert sum(result.layers.values()) == result.total_ms == 100.0  # engine's last 4 ms are clipped
    assert result.bottleneck == "models"
    assert result.header() == "application=8;data=10;models=77;orchestration=5;compute=0"
    assert parse_header(result.header()) == result.layers
    assert list(result.as_json()["layers"]) == list(LAYERS)


def test_a_running_span_counts_up_to_now_and_an_unknown_parent_hangs_off_the_root() -> None:
    spans_ = [Timed(1, None, "application", 0, None), Timed(2, 1, "orchestration", 2 * MS, None)]
    spans_.append(Timed(3, 99, "data", 1 * MS, 2 * MS))
    result = breakdown(spans_, 1, now_ns=10 * MS)
    assert result.layers["orchestration"] == 8.0 and result.layers["data"] == 1.0
    assert result.layers["application"] == 1.0 and result.total_ms == 10.0


@pytest.mark.parametrize("total_us", [0, 7, 250, 1_000, 9_999, 10_000, 41_207, 1_234_567, 86_400_000_123])
def test_the_texts_are_the_shortest_milliseconds_with_up_to_three_decimals(total_us: int) -> None:
    """Under 10 ms from the kept texts, over it written afresh: the same form either way, as Python
    writes the float (``41.207``, ``0.25``, ``1`` for 1.0)."""
    us = (
        total_us // 7,
        0,
        total_us // 2,
        total_us // 5,
        total_us - total_us // 7 - total_us // 2 - total_us // 5,
    )
    for _ in range(2):  # written, then kept
        made = Breakdown.of_us(us, total_us)
        as_float = [repr(u / 1000).removesuffix(".0") for u in (*us, total_us)]
        assert made.header() == ";".join(
            f"{layer}={text}" for layer, text in zip(LAYERS, as_float, strict=False)
        )
        assert json.loads(made.json())["total_ms"] == float(as_float[-1])
        assert json.loads(made.json())["bottleneck"] == made.bottleneck
        assert parse_header(made.header()) == made.layers


def test_the_bottleneck_is_the_first_of_equals_and_none_for_no_time() -> None:
    for us, named in (((5, 0, 5, 0, 0), "application"), ((0, 2, 7, 7, 1), "models"), ((0,) * 5, None)):
        made = Breakdown.of_us(us, sum(us))
        assert made.bottleneck == named and json.loads(made.json())["bottleneck"] == named


def test_parse_header_refuses_a_malformed_value() -> None:
    with pytest.raises(ValueError, match="layer=ms"):
        parse_header("application:3")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    s.migrate()
    yield s
    s.close()


def _provider(store: Store, policy: SamplingPolicy) -> tuple[TracerProvider, TraceKeeper]:
    provider = TracerProvider(shutdown_on_exit=False)
    keeper = TraceKeeper(TraceSampler(policy), SpanWriter(store, linger_s=0.0))
    provider.add_span_processor(keeper)
    return provider, keeper


def _request(tracer: trace.Tracer, *, error: bool = False, sleep_s: float = 0.0, status: int = 500) -> str:
    with tracer.start_as_current_span("POST /v1/chat/completions", attributes={LAYER: "application"}) as root:
        root.set_attributes({"http.route": "/v1/chat/completions", "lamina.deployment": "chat"})
        with tracer.start_as_current_span("dispatch", attributes={LAYER: "orchestration"}):
            time.sleep(sleep_s)
        if error:
            root.set_status(Status(StatusCode.ERROR, "boom"))
        root.set_attribute("http.response.status_code", status if error else 200)
        return format(root.get_span_context().trace_id, "032x")


def test_only_kept_traces_reach_the_store_with_their_summary(store: Store) -> None:
    provider, keeper = _provider(store, SamplingPolicy(rate=0.0, per_s=0.0, slow_ms=30))
    tracer = provider.get_tracer("t")
    ordinary = [_request(tracer) for _ in range(20)]
    failed, slow = _request(tracer, error=True), _request(tracer, sleep_s=0.04)
    refused = _request(tracer, error=True, status=429)  # within the client errors' cap
    assert provider.force_flush()
    assert keeper.decided == {"dropped": 20, "error": 2, "slow": 1, "sampled": 0}
    assert read_summary(store, refused) is not None
    assert all(read_trace(store, t) == [] and read_summary(store, t) is None for t in ordinary)
    assert {s["name"] for s in read_trace(store, failed)} == {"POST /v1/chat/completions", "dispatch"}
    summary = read_summary(store, slow)
    assert summary is not None and summary["kept"] == "slow" and summary["status"] == "ok"
    assert (summary["route"], summary["model"], summary["http_status"]) == (
        "/v1/chat/completions",
        "chat",
        200,
    )
    assert summary["bottleneck"] == "orchestration" and summary["layers"]["orchestration"] >= 40
    assert summary["span_count"] == 2 and summary["size_bytes"] > 300
    rows = read_trace(store, slow)
    assert sum(summary["layers"].values()) == pytest.approx(
        (rows[0]["end_ns"] - rows[0]["start_ns"]) / MS, abs=0.01
    )
    assert [t["trace_id"] for t in list_traces(store)] == [refused, slow, failed]
    assert [t["trace_id"] for t in list_traces(store, status="error")] == [refused, failed]
    provider.shutdown()


def _old_trace(store: Store, trace_id: str, start_ns: int, size: int = 1000, n_spans: int = 3) -> None:
    with store.begin() as conn:
        conn.execute(
            insert(traces),
            {
                "trace_id": trace_id,
                "start_ns": start_ns,
                "duration_ms": 1.0,
                "status": "ok",
                "http_status": 200,
                "route": "/v1/chat/completions",
                "model": "chat",
                "layers": {},
                "bottleneck": None,
                "kept": "sampled",
                "span_count": n_spans,
                "size_bytes": size,
            },
        )
        conn.execute(
            insert(spans),
            [
                {
                    "span_id": f"{trace_id[-12:]}{i:04x}",
                    "trace_id": trace_id,
                    "parent_span_id": None,
                    "name": "x",
                    "layer": "application",
                    "start_ns": start_ns + i,
                    "end_ns": start_ns + i + 1,
                    "status": "unset",
                    "attributes": {},
                }
                for i in range(n_spans)
            ],
        )


def _counts(store: Store) -> tuple[int, int]:
    with store.begin() as conn:
        return (
            conn.execute(select(func.count()).select_from(traces)).scalar_one(),
            conn.execute(select(func.count()).select_from(spans)).scalar_one(),
        )


def test_retention_deletes_by_age_then_count(store: Store) -> None:
    now = 10**18
    retention = TraceRetention(store, RetentionPolicy(max_age_s=3600, max_traces=50), now_ns=lambda: now)
    for i in range(100):  # one a minute, the newest a minute old: 59 within the hour
        _old_trace(store, f"{i:032x}", now - (100 - i) * 60 * 10**9)
    pruned = retention.run_once()
    assert pruned.traces == 50 and pruned.spans == 150 and _counts(store) == (50, 150)
    retention.policy = RetentionPolicy(max_age_s=3600, max_traces=20)
    retention.run_once()
    left = list_traces(store, limit=1000)
    assert len(left) == 20 and left[-1]["trace_id"] == f"{80:032x}"  # the newest 20
    assert _counts(store) == (20, 60)
    # the byte limit (measured by the database) is tested in tests/integration/test_trace_retention_bound.py


def test_retention_removes_old_orphan_spans_and_replay_rows_of_dropped_traces(store: Store) -> None:
    now = time.time_ns()
    retention = TraceRetention(store, RetentionPolicy(max_age_s=3600), now_ns=lambda: now)
    _old_trace(store, "a" * 32, now - 10**9)
    with store.begin() as conn:  # spans without a summary (stored before migration 0011), a day old
        conn.execute(
            insert(spans),
            [
                {
                    "span_id": f"{i:016x}",
                    "trace_id": "b" * 32,
                    "parent_span_id": None,
                    "name": "x",
                    "layer": None,
                    "start_ns": now - 86400 * 10**9,
                    "end_ns": now - 86400 * 10**9,
                    "status": "unset",
                    "attributes": {},
                }
                for i in range(5)
            ],
        )
        created = datetime.fromtimestamp(now / 1e9 - 120, UTC)
        rows = [
            {
                "trace_id": t,
                "created_at": created,
                "route": "/v1/chat/completions",
                "body": {},
                "versions": {},
            }
            for t in ("a" * 32, "c" * 32)
        ]
        conn.execute(insert(replay_requests), rows)
    assert retention.run_once().spans == 5
    with store.begin() as conn:
        kept = conn.execute(select(replay_requests.c.trace_id)).scalars().all()
    assert kept == ["a" * 32] and _counts(store) == (1, 3)


def test_a_writer_that_cannot_keep_up_drops_whole_traces_and_counts_them(tmp_path: Path) -> None:
    bare = Store(f"sqlite:///{tmp_path / 'bare.db'}")  # never migrated: every write fails
    provider = TracerProvider(shutdown_on_exit=False)
    writer = SpanWriter(bare, max_queued=1, linger_s=0.0)
    provider.add_span_processor(TraceKeeper(TraceSampler(SamplingPolicy(per_s=1e6)), writer))
    tracer = provider.get_tracer("t")
    for _ in range(30):
        _request(tracer)
    assert writer.flush(10)
    assert writer.dropped + writer.lost == 60  # 30 traces of 2 spans, none written, none raised
    provider.shutdown()
    bare.close()


def test_roots_that_never_end_are_forgotten_beyond_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lamina.observability._keeper.MAX_OPEN_TRACES", 3)
    provider = TracerProvider(shutdown_on_exit=False)
    keeper = TraceKeeper(TraceSampler(SamplingPolicy()))
    provider.add_span_processor(keeper)
    tracer = provider.get_tracer("t")
    leaked = [tracer.start_span(f"root {i}") for i in range(10)]
    assert len(keeper._open) == 3
    assert keeper.breakdown(leaked[-1]) is not None and keeper.breakdown(leaked[0]) is None
    provider.shutdown()


def test_tracing_off_records_nothing_and_has_no_breakdown() -> None:
    telemetry = Telemetry(service_name="t", tracing=False)
    with telemetry.span("root", Layer.APPLICATION) as span:
        assert not span.is_recording()
    assert telemetry.keeper.decided["dropped"] == 0 and telemetry.keeper._open == {}
    telemetry.shutdown()


def test_light_spans_speak_the_opentelemetry_api() -> None:
    telemetry = Telemetry(service_name="t")
    with pytest.raises(ValueError), telemetry.span("root", Layer.APPLICATION) as root:
        root.set_attributes({"a": 1, "b": [1, 2]})
        with telemetry.span("child", Layer.DATA) as child:
            assert trace.get_current_span() is child and child.is_recording()
            assert child.get_span_context().trace_id == root.get_span_context().trace_id
        raise ValueError("boom")
    assert not root.is_recording()
    root.set_attribute("late", True)  # ignored once ended, as the SDK does
    assert isinstance(root, LightSpan) and isinstance(child, LightSpan)  # they read like ReadableSpans
    assert root.status.status_code is StatusCode.ERROR and "late" not in (root.attributes or {})
    assert [e.name for e in root.events] == ["exception"]
    assert root.events[0].attributes is not None and root.events[0].attributes["exception.message"] == "boom"
    assert child.parent is not None and child.parent.span_id == root.get_span_context().span_id
    assert telemetry.keeper.decided["error"] == 1
    given = MappingProxyType({LAYER: "application", "http.route": "/v1/x"})  # any mapping: copied
    request = telemetry.tracer.start_root("POST /v1/x", given)
    assert isinstance(request, LightSpan) and request.attributes == given and request.layer == "application"
    request.end()
    telemetry.shutdown()


def test_the_compute_span_names_the_device_and_its_utilisation_of_the_latest_sample() -> None:
    telemetry = Telemetry(service_name="t")
    telemetry.device_kinds = {"chat": "gpu", "embed": "cpu"}
    assert telemetry.device_span("embed") == {LAYER: "compute", "lamina.device.kind": "cpu"}  # no sample yet
    telemetry.devices.set_node("n1", load1=1.5, usable_cores=2, memory_total=8, memory_available=4)
    for gpu, util in (("0", 90.0), ("1", 50.0)):
        telemetry.devices.set_gpu(
            ("n1", gpu, f"GPU-{gpu}", "NVIDIA H200"),
            utilization_pct=util,
            memory_used=1,
            memory_free=1,
            temperature_c=None,
            power_w=None,
        )
    on_gpu = telemetry.device_span("chat")
    assert on_gpu["lamina.device.utilization_pct"] == 70.0 and on_gpu["lamina.device.name"] == "NVIDIA H200"
    cpu = telemetry.device_span("embed")
    assert (cpu["lamina.device.node"], cpu["lamina.device.utilization_pct"]) == ("n1", 75.0)
    telemetry.shutdown()


def _summed(spans_: list[Timed], now_ns: int) -> dict[str, float]:
    """The breakdown as the light tracer sums it: each span's time added as it ends (records at once)."""
    opened = OpenTrace(1, 1)
    for s in spans_:
        opened.begin(object(), s.span_id, s.parent_id, s.layer, s.start_ns)
    for s in sorted((s for s in spans_ if s.end_ns is not None), key=lambda s: s.end_ns or 0):
        opened.end(s.span_id, s.end_ns or 0)
    return opened.breakdown(now_ns).layers


def test_the_breakdown_summed_as_spans_end_equals_the_walk_over_the_finished_trace() -> None:
    nested = [
        Timed(1, None, "application", 0, 100 * MS),
        Timed(2, 1, "models", 1 * MS, 3 * MS),
        Timed(3, 1, "data", 3 * MS, 13 * MS),
        Timed(4, 3, None, 5 * MS, 8 * MS),
        Timed(5, 1, "orchestration", 15 * MS, 95 * MS),
        Timed(6, 5, "models", 20 * MS, 90 * MS),
        Timed(7, 6, "compute", 20 * MS, 20 * MS),
    ]
    assert _summed(nested, 200 * MS) == breakdown(nested, 1, now_ns=200 * MS).layers
    running = [Timed(1, None, "application", 0, None), Timed(2, 1, "orchestration", 2 * MS, None)]
    running.append(Timed(3, 99, "data", 1 * MS, 2 * MS))  # an unknown parent: the root's child
    assert _summed(running, 10 * MS) == breakdown(running, 1, now_ns=10 * MS).layers


def test_records_count_at_once_and_become_spans_with_their_children_only_when_kept(store: Store) -> None:
    keeper = TraceKeeper(TraceSampler(SamplingPolicy(rate=0.0, per_s=0.0)), SpanWriter(store, linger_s=0.0))
    telemetry = Telemetry(service_name="t")
    telemetry.keeper = keeper
    telemetry.tracer = LightTracer(keeper, keeper.resource)
    t0 = time.time_ns() - 20 * MS  # the replica's times are in the past; a record is clipped to now
    root = telemetry.tracer.start_span(
        "POST /v1/chat/completions", attributes={LAYER: "application"}, start_time=t0
    )
    ctx = root.get_span_context()
    models = {LAYER: "models"}
    later = (("queue", models, t0, t0 + 2 * MS), ("device", {LAYER: "compute"}, t0 + 2 * MS, t0 + 3 * MS))
    engine = keeper.add(ctx.trace_id, ctx.span_id, "engine", models, t0, t0 + 5 * MS, later)
    assert engine is not None
    layers = keeper.breakdown(root)
    assert layers is not None and layers.layers["models"] == 4.0 and layers.layers["compute"] == 1.0
    root.set_status(Status(StatusCode.ERROR, "boom"))
    root.end(t0 + 10 * MS)
    assert keeper.decided["error"] == 1 and keeper.breakdown(root) is None
    assert keeper.add(ctx.trace_id, ctx.span_id, "late", models, t0, t0) is None  # decided: not recorded
    assert keeper.writer is not None and keeper.writer.flush(10)
    rows = {r["name"]: r for r in read_trace(store, format(ctx.trace_id, "032x"))}
    assert set(rows) == {"POST /v1/chat/completions", "engine", "queue", "device"}
    assert rows["queue"]["parent_span_id"] == rows["device"]["parent_span_id"] == rows["engine"]["span_id"]
    assert rows["engine"]["parent_span_id"] == rows["POST /v1/chat/completions"]["span_id"]
