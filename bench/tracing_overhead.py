"""What tracing, span storage and the per-layer breakdown cost the gateway, and how big the trace store gets.

    apt-get install wrk                    # the load generator (C, so the client costs little CPU)
    .venv/bin/python bench/tracing_overhead.py [--seconds 4] [--rounds 8] [--store-traces 100000] [--cpu 200]

Part 1, HTTP (one run, side by side): two `lamina up` stacks serve the same fake-engine deployment (the
chat request of bench/gateway_overhead.py, 8 tokens, non-streamed):

- off: ``observability: {tracing: false, store_spans: false, metrics: false}``: no spans, no breakdown,
  nothing stored, nothing counted;
- on: the defaults: every span recorded, the x-lamina-layers header and the ``lamina`` extension on every
  answer, tail-aware sampling into the store (errors, slow ones, up to 2 others a second), retention, and
  the Prometheus metrics.

(``--keep-all`` adds a third stack that stores every trace, the worst case of an error storm.)
wrk drives each stack in turn, ``--rounds`` times (off then on, on then off, ...) so that drift of a
shared machine hits both alike, at 1 and 16 connections; reported: requests per second, p50/p99, and the
gateway process's CPU time per request, with the cost of "on" against "off" (target: under 3%), also as
the median over rounds of each round's pair (this machine's speed drifts 10-30% within minutes).

Part 2, the store's bound (``--store-traces N``, default 100,000): N request-shaped traces (the spans one
chat request records: root, route, dispatch, engine, queue, prefill, decode, device) through the real
keeper, writer and retention on a SQLite store, as fast as the writer takes them, every trace kept (the
worst case), with retention's default limits (50,000 traces, 64 MiB) running every second. Reported: the
``traces`` and ``spans`` rows at the end; the bytes the trace tables and their indexes occupy (SQLite's
``dbstat``, what the bound limits) at the end, against the bound; the file's pages in use (all tables: an
upper bound of the trace tables') at the end and at most, sampled every 1,000 traces; the database
file's size and its WAL's, at the end and at most; and the same N
traces under the default sampling, driven at 1,000 requests a second of simulated time (how many are kept).
This drives the exporter directly: 100k HTTP requests would take minutes per stack on a small machine.

Part 3, in process (``--cpu``): the same chat request through two gateway apps in this process, off and
on, in interleaved batches (the median of the per-pair differences), without the network's noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import AttributeValue
from sqlalchemy import func, select, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from gateway_overhead import MODEL, TOKENS, _machine, wrk  # noqa: E402
from tests.support import CHAT, EMBED, ReplayDispatcher, StaticCatalog, start_stack, stop_stack  # noqa: E402

from lamina.application import GatewayDeps, create_app  # noqa: E402
from lamina.observability import (  # noqa: E402
    LAYER,
    RetentionPolicy,
    SamplingPolicy,
    Telemetry,
    TraceRetention,
    TraceSampler,
)
from lamina.observability._keeper import TraceKeeper  # noqa: E402
from lamina.observability._store_exporter import SpanWriter  # noqa: E402
from lamina.observability._trace_size import stored_bytes, used_bytes  # noqa: E402
from lamina.stack.gateway import settle_garbage_collector  # noqa: E402
from lamina.store import Store, spans, traces  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    "off": {"tracing": False, "store_spans": False, "metrics": False},
    "on": {},
    "keep-all": {"sampled_per_s": 1_000_000.0},
}


@contextmanager
def stack_of(tmp: Path, observability: dict[str, Any]) -> Iterator[tuple[str, psutil.Process]]:
    deployment = {"name": MODEL, "engine": "fake", "options": {"fake": {"mode": "replay", "tokens": TOKENS}}}
    config = {"register_bundled": False, "deployments": [deployment], "observability": observability}
    tmp.mkdir(parents=True, exist_ok=True)
    stack = start_stack(tmp, json.dumps(config))
    try:
        yield stack.base_url, psutil.Process(stack.proc.pid)
    finally:
        stop_stack(stack)


def http_part(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    names = ["off", "on"] + (["keep-all"] if args.keep_all else [])
    out: dict[str, Any] = {}
    with ExitStack() as stacks:
        targets = {n: stacks.enter_context(stack_of(tmp / n, MODES[n])) for n in names}
        for url, _ in targets.values():  # warm up: imports, connection pools
            wrk(f"{url}/v1/chat/completions", None, 4, 2, None)
        if args.pin:
            _pin([proc for _, proc in targets.values()])
        for connections in (1, 16):
            for rnd in range(args.rounds):
                order = list(targets.items())
                for name, (url, proc) in order if rnd % 2 == 0 else order[::-1]:  # neither always first
                    load = wrk(f"{url}/v1/chat/completions", None, connections, args.seconds, proc)
                    runs = out.setdefault(name, {}).setdefault(str(connections), [])
                    runs.append(asdict(load) | {"cpu_ms_per_request": load.cpu_ms_per_request})
                    print(
                        f"round {rnd} {name:8s} c={connections:2d} {load.rps:8.1f} req/s  "
                        f"p50 {load.p50_ms:6.2f} ms  p99 {load.p99_ms:6.2f} ms  "
                        f"cpu {load.cpu_ms_per_request:6.3f} ms/req  err {load.errors}"
                    )
    return out


def _pin(gateways: list[psutil.Process]) -> None:
    """Every thread of each gateway on the first CPU; the replicas, wrk (started from here) and this
    process on the others: the gateway's CPU per request no longer depends on what shares its core."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return
    first, rest = {cpus[0]}, set(cpus[1:])
    for gateway in gateways:
        for task in Path(f"/proc/{gateway.pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), first)
        for child in gateway.children(recursive=True):
            for task in Path(f"/proc/{child.pid}/task").iterdir():
                os.sched_setaffinity(int(task.name), rest)
    os.sched_setaffinity(0, rest)


def _summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    requests = sum(r["requests"] for r in runs)
    return {
        "rps": sum(r["rps"] for r in runs) / len(runs),
        "p50_ms": sorted(r["p50_ms"] for r in runs)[len(runs) // 2],
        "p99_ms": sorted(r["p99_ms"] for r in runs)[len(runs) // 2],
        "cpu_ms_per_request": sum(r["cpu_s"] for r in runs) * 1000 / max(requests, 1),
        "errors": sum(r["errors"] for r in runs),
    }


def _request_trace(tracer: trace.Tracer, error: bool) -> None:
    """The spans one chat request records, with attributes of the same size."""
    with tracer.start_as_current_span("POST /v1/chat/completions", attributes={LAYER: "application"}) as root:
        root.set_attributes(
            {
                "http.request.method": "POST",
                "http.route": "/v1/chat/completions",
                "url.path": "/v1/chat/completions",
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": MODEL,
                "gen_ai.request.temperature": 0.0,
                "lamina.deployment": MODEL,
                "gen_ai.response.model": MODEL,
                "gen_ai.usage.input_tokens": 41,
                "gen_ai.usage.output_tokens": 8,
                "http.response.status_code": 500 if error else 200,
            }
        )
        with tracer.start_as_current_span(
            "route", attributes={LAYER: "models", "gen_ai.request.model": MODEL}
        ):
            pass
        attrs: dict[str, AttributeValue] = {
            LAYER: "orchestration",
            "lamina.deployment": MODEL,
            "lamina.replica.id": f"{MODEL}-0",
        }
        with tracer.start_as_current_span("dispatch", attributes=attrs):
            models: dict[str, AttributeValue] = {
                LAYER: "models",
                "lamina.queue_ms": 0.1,
                "lamina.ttft_ms": 0.3,
                "lamina.engine_ms": 0.9,
            }
            with tracer.start_as_current_span("engine", attributes=models):
                for name in ("queue", "prefill", "decode"):
                    with tracer.start_as_current_span(name, attributes={LAYER: "models"}):
                        pass
                compute: dict[str, AttributeValue] = {
                    LAYER: "compute",
                    "lamina.device.kind": "cpu",
                    "lamina.device.utilization_pct": 42.0,
                }
                with tracer.start_as_current_span("device", attributes=compute):
                    pass
        if error:
            root.set_status(Status(StatusCode.ERROR, "engine_error: bench"))


def _file_bytes(path: Path) -> dict[str, int]:
    """The SQLite file and its WAL as they are on disk now."""
    wal = path.with_name(path.name + "-wal")
    return {"file": path.stat().st_size, "wal": wal.stat().st_size if wal.exists() else 0}


def _measure(store: Store, *, walk: bool = True) -> tuple[int, int]:
    """The trace tables' bytes (what the bound limits; 0 unless ``walk``: a page walk, whose long read
    would hold back the WAL's checkpoints) and the file's pages in use (cheap), in bytes."""
    with store.begin() as conn:
        return stored_bytes(conn) if walk else 0, used_bytes(conn)


def store_part(n: int, tmp: Path) -> dict[str, Any]:
    path = tmp / "store" / "lamina.db"
    path.parent.mkdir(parents=True)
    store = Store(f"sqlite:///{path}")
    store.migrate()
    policy = RetentionPolicy()
    retention = TraceRetention(store, policy)
    retention.start(1.0)
    writer = SpanWriter(store)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(TraceKeeper(TraceSampler(SamplingPolicy(per_s=1e9)), writer))
    tracer = provider.get_tracer("bench")
    peak = {"used": 0, "file": 0, "wal": 0}
    began = time.perf_counter()
    for i in range(n):
        _request_trace(tracer, error=i % 50 == 0)
        if i % 1000 == 999:
            writer.flush(60)  # as fast as the writer takes them: nothing dropped
            on_disk = _file_bytes(path) | {"used": _measure(store, walk=False)[1]}
            peak = {k: max(v, on_disk[k]) for k, v in peak.items()}
            if i % 20_000 == 19_999:
                print(f"store: {i + 1} traces written, {time.perf_counter() - began:.0f} s, {peak}")
    writer.flush(60)
    seconds = time.perf_counter() - began
    retention.stop()
    pruned = retention.run_once()  # the last pass, as the background one would
    with store.begin() as conn:
        n_traces = conn.execute(select(func.count()).select_from(traces)).scalar_one()
        n_spans = conn.execute(select(func.count()).select_from(spans)).scalar_one()
        stored = conn.execute(select(func.coalesce(func.sum(traces.c.size_bytes), 0))).scalar_one()
    measured, used = _measure(store)
    before_checkpoint = _file_bytes(path)
    with store.begin() as conn:
        conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    result = {
        "traces_sent": n,
        "seconds": round(seconds, 1),
        "traces_per_s": round(n / seconds, 1),
        "traces_rows": n_traces,
        "spans_rows": n_spans,
        "estimated_bytes": int(stored),
        "stored_bytes": measured,
        "used_bytes": used,
        "peak_used_bytes": max(peak["used"], used),
        "file_bytes": _file_bytes(path)["file"],
        "peak_file_bytes": max(peak["file"], before_checkpoint["file"]),
        "peak_wal_bytes": max(peak["wal"], before_checkpoint["wal"]),
        "bound_traces": policy.max_traces,
        "bound_bytes": policy.max_bytes,
        "last_pass_deleted": asdict(pruned),
        "lost": writer.lost + writer.dropped,
    }
    provider.shutdown()
    store.close()
    # the default sampling at a sustained 1,000 requests a second (simulated time): how many it keeps
    clock = [0.0]
    sampler = TraceSampler(SamplingPolicy(), clock=lambda: clock[0])
    kept = 0
    for i in range(n):
        clock[0] = i / 1000
        kept += sampler.decide(error=i % 1000 == 0, duration_ms=2.0) is not None
    result["default_sampling_kept_of_n_at_1000_rps"] = kept
    return result


async def _inprocess(
    telemetries: dict[str, Telemetry], batch: int, pairs: int, stream: bool
) -> dict[str, Any]:
    """Process CPU per request of chat requests through two gateway apps in this process (off and on),
    ``pairs`` times a batch of ``batch`` each, alternating which goes first: the median of the per-pair
    differences is what tracing adds, drift of the machine cancelled out of each pair."""
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    clients: dict[str, httpx.AsyncClient] = {}
    ready = {CHAT: True, EMBED: True}
    for name, telemetry in telemetries.items():
        deps = GatewayDeps(StaticCatalog(), ReplayDispatcher(), lambda: ready, telemetry, ())
        transport = httpx.ASGITransport(app=create_app(deps))
        clients[name] = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")
    for client in clients.values():  # warm up
        for _ in range(200):
            await client.post("/v1/chat/completions", json=body)
            await anyio.sleep(0)
    settle_garbage_collector()  # as the gateway does before it serves
    per: dict[str, list[float]] = {name: [] for name in clients}
    for i in range(pairs):
        for name in list(clients) if i % 2 == 0 else list(clients)[::-1]:
            began = time.process_time()
            for _ in range(batch):
                r = await clients[name].post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                # the event loop's turn, as a server's socket gives it: ASGITransport never suspends, so
                # without it each request's cancelled watcher task waits (alive, with its request) until
                # the batch ends, and the collector walks hundreds of them (was 10% of the CPU measured)
                await anyio.sleep(0)
            per[name].append((time.process_time() - began) * 1000 / batch)
    for client in clients.values():
        await client.aclose()
    added = [on - off for on, off in zip(per["on"], per["off"], strict=True)]
    return {
        "off": statistics.median(per["off"]),
        "on": statistics.median(per["on"]),
        "added_ms": statistics.median(added),
        "pairs": pairs,
        "batch": batch,
    }


def cpu_part(batch: int, pairs: int) -> dict[str, Any]:
    """The gateway's CPU per request in process (no network, the fake replies of tests/support; the
    client's share too): tracing, breakdown and metrics off against on (no store: part 2 measures it)."""
    out: dict[str, Any] = {}
    for stream in (False, True):
        telemetries = {
            name: Telemetry(service_name="bench", tracing=name == "on", metrics=name == "on")
            for name in ("off", "on")
        }
        out["stream" if stream else "plain"] = anyio.run(_inprocess, telemetries, batch, pairs, stream)
        for telemetry in telemetries.values():
            telemetry.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each wrk run")
    ap.add_argument("--rounds", type=int, default=8, help="wrk runs per stack and concurrency, interleaved")
    ap.add_argument("--keep-all", action="store_true", help="a third stack that stores every trace")
    ap.add_argument("--store-traces", type=int, default=100_000, help="traces for the store bound (0: skip)")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--pin", action="store_true", help="gateways on the first CPU, the rest elsewhere")
    ap.add_argument("--cpu", type=int, default=200, help="requests per in-process CPU batch (0: skip)")
    ap.add_argument("--cpu-pairs", type=int, default=40, help="in-process batches per mode, interleaved")
    args = ap.parse_args()
    result: dict[str, Any] = {"machine": _machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_http:
            runs = http_part(args, tmp)
            result["http_runs"] = runs
            result["http"] = {n: {c: _summary(r) for c, r in levels.items()} for n, levels in runs.items()}
            result["http_paired"] = _paired(runs)
        if args.cpu:
            result["cpu"] = cpu_part(args.cpu, args.cpu_pairs)
        if args.store_traces:
            result["store"] = store_part(args.store_traces, tmp)
    print(report(result))
    out = ROOT / "bench" / "results" / f"tracing_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out.relative_to(ROOT)}")


def _paired(runs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per connection count, the medians over rounds of on against off in the same round: the machine's
    drift between rounds (often 10-30% here within minutes) cancels out of each pair."""
    out: dict[str, dict[str, float]] = {}
    for c, offs in runs["off"].items():
        ons = runs["on"][c]
        pairs = list(zip(ons, offs, strict=True))
        rps = sorted(1 - on["rps"] / off["rps"] for on, off in pairs)
        cpu = sorted(on["cpu_ms_per_request"] / off["cpu_ms_per_request"] - 1 for on, off in pairs)
        added = sorted(on["cpu_ms_per_request"] - off["cpu_ms_per_request"] for on, off in pairs)
        out[c] = {
            "rounds": len(rps),
            "rps_cost_pct": statistics.median(rps) * 100,
            "cpu_cost_pct": statistics.median(cpu) * 100,
            "cpu_added_ms": statistics.median(added),
        }
    return out


def report(result: dict[str, Any]) -> str:
    lines = [""]
    http = result.get("http")
    if http:
        lines.append("| | connections | req/s | p50 ms | p99 ms | gateway CPU ms/req | throughput cost |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, levels in http.items():
            for c, s in levels.items():
                base = http["off"][c]["rps"]
                cost = "" if name == "off" else f"{(1 - s['rps'] / base) * 100:+.1f}%"
                lines.append(
                    f"| {name} | {c} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                    f"{s['cpu_ms_per_request']:.3f} | {cost} |"
                )
        for c in http["on"]:
            extra = http["on"][c]["cpu_ms_per_request"] - http["off"][c]["cpu_ms_per_request"]
            lines.append(f"tracing CPU per request at {c} connections: {extra:+.3f} ms")
        for c, paired in _paired(result["http_runs"]).items():
            lines.append(
                f"paired by round at {c} connections (median of {paired['rounds']}): throughput cost "
                f"{paired['rps_cost_pct']:+.1f}%, gateway CPU per request {paired['cpu_cost_pct']:+.1f}% "
                f"({paired['cpu_added_ms']:+.4f} ms)"
            )
    for kind, c in (result.get("cpu") or {}).items():
        lines.append(
            f"in process ({kind}, median of {c['pairs']} interleaved batches of {c['batch']}): "
            f"{c['off']:.3f} CPU ms/request off, {c['on']:.3f} on: tracing adds {c['added_ms']:.4f} ms "
            f"({c['added_ms'] / c['off'] * 100:+.1f}%)"
        )
    store = result.get("store")
    if store:
        mib = 2**20
        lines.append(
            f"store: {store['traces_sent']} traces written ({store['traces_per_s']:.0f}/s), every one "
            f"kept: {store['traces_rows']} traces / {store['spans_rows']} spans left "
            f"(bound {store['bound_traces']}); trace tables with their indexes "
            f"{store['stored_bytes'] / mib:.1f} MiB at the end (bound {store['bound_bytes'] / mib:.0f} MiB); "
            f"pages in use (all tables) {store['used_bytes'] / mib:.1f} MiB, at most "
            f"{store['peak_used_bytes'] / mib:.1f} MiB; database file {store['file_bytes'] / mib:.1f} MiB, "
            f"at most {store['peak_file_bytes'] / mib:.1f} MiB + {store['peak_wal_bytes'] / mib:.1f} MiB WAL"
        )
        lines.append(
            f"default sampling at 1,000 req/s: {store['default_sampling_kept_of_n_at_1000_rps']} of "
            f"{store['traces_sent']} kept"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
