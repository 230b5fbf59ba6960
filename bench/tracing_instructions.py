"""What tracing, the breakdown and the metrics cost the gateway, counted in CPU instructions (deterministic).

    apt-get install valgrind
    .venv/bin/python bench/tracing_instructions.py [--requests 1024] [--stream] [--http]

The timing benches (bench/tracing_overhead.py) cannot resolve a few percent on a small shared machine,
whose speed drifts 10-30% within minutes. This one counts the instructions the gateway executes per
request with valgrind's callgrind, which gives the same count for the same run within about 0.3%: the
in-process gateway app of bench/tracing_overhead.py (the fake replies of tests/support, reached through
httpx's ASGI transport, so the client's share is in the count), once with everything off and once with
everything on, side by side (two valgrind processes at once). Each run sends 100 requests, settles the
garbage collector as the gateway does, switches counting on, sends ``--requests`` requests (1,024 include
one batch of the metrics fold), and switches it off.

Two things differ under valgrind, which runs the code about 50 times slower, and are set back to what a
real run sees:

- the sampler keeps 2 ordinary traces a second: at a 50th of the speed that is every tenth trace, where
  a real gateway under load keeps a few in thousands, so the sampler's decision is made "drop" (a kept
  trace's cost is the span writer's, on its own thread, measured by the store part of the other bench);
- the breakdown's texts are kept for the numbers under 10 ms (a real request's), which times 50 times
  longer miss: they are kept up to 1,000 ms instead.

``--http`` counts the gateway as it serves: two ``lamina up`` stacks (off and on, as in
bench/tracing_overhead.py), each gateway process under callgrind (its fake-engine replica runs natively),
reached over HTTP by a client in this process, one request at a time on a keep-alive connection, each
request its own text (the chat request of bench/gateway_overhead.py). The count is the gateway's alone
(no client in it): its event loop (the HTTP server, the request path, the relay to the replica) apart
from its other threads (the span writer, retention, the cost ledger, thread pools). What runs on a clock
(health checks, retention's probe, the device sampler) runs 50 times as often per request under valgrind,
so each stack is also counted idle for ``--idle-s`` seconds and each part's idle rate, times the
requests' wall time, is taken off. The event loop's figure is the one to compare: the other threads work
in batches (a transaction per batch of ledger rows, a probe a second) that hold 50 times fewer requests
under valgrind, so their per-request figures are far above a real run's. The sampler keeps
``sampled_per_s`` / 50 ordinary traces a second, a real gateway's share; the breakdown's texts are kept
up to 10 ms as in a real run (longer times are written afresh, a few hundred instructions each).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def child(mode: str, requests: int, stream: bool) -> None:
    """One counted run (under valgrind)."""
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    import anyio
    from tracing_overhead import CHAT, EMBED, GatewayDeps, ReplayDispatcher, StaticCatalog, create_app

    from lamina.observability import Telemetry, _breakdown
    from lamina.stack.gateway import settle_garbage_collector

    telemetry = Telemetry(service_name="bench", tracing=mode == "on", metrics=mode == "on")
    if mode == "on":
        telemetry.keeper.sampler.decide = lambda *_, **__: None  # type: ignore[method-assign]
        telemetry.keeper.sampler.ordinary = lambda *_: None  # type: ignore[method-assign]
        _breakdown._TABLE = 1_000_000  # microseconds: texts up to 1,000 ms kept

    def count(on: bool) -> None:
        command = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
        subprocess.run(command, check=True, capture_output=True)

    async def run() -> None:
        ready = {CHAT: True, EMBED: True}
        app = create_app(GatewayDeps(StaticCatalog(), ReplayDispatcher(), lambda: ready, telemetry, ()))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")
        body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        for n in range(100 + requests):
            if n == 100:
                settle_garbage_collector()
                count(True)
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            await anyio.sleep(0)  # the event loop's turn, as a server's socket gives it
        count(False)
        await client.aclose()

    anyio.run(run)
    telemetry.shutdown()


#: how much slower the gateway runs under callgrind (what the sampler's rate is divided by)
SLOWDOWN = 50


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _dumped(out: Path, n: int) -> tuple[int, int]:
    """The instructions in callgrind's ``n``-th dump of ``out``: the main thread's (the event loop: the
    request path) and the other threads' (the span writer, retention, the cost ledger, thread pools)."""
    main = others = 0
    for part in out.parent.glob(f"{out.name}.{n}-*"):
        found = re.search(r"^(?:summary|totals): (\d+)", part.read_text(errors="replace"), re.M)
        if found is None:
            sys.exit(f"no total in {part}")
        if part.name.endswith("-01"):
            main = int(found.group(1))
        else:
            others += int(found.group(1))
    return main, others


def http_count(mode: str, tmp: Path, requests: int, stream: bool, idle_s: float) -> dict[str, float]:
    """One stack, its gateway under callgrind: instructions idle (per second) and per request."""
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    from gateway_overhead import MODEL, PROMPT, TOKENS
    from tests.support import free_port
    from tracing_overhead import MODES

    observability = MODES["off"] if mode == "off" else {"sampled_per_s": 2.0 / SLOWDOWN}
    deployment = {"name": MODEL, "engine": "fake", "options": {"fake": {"mode": "replay", "tokens": TOKENS}}}
    config = {"register_bundled": False, "deployments": [deployment], "observability": observability}
    tmp.mkdir(parents=True)
    (tmp / "lamina.yaml").write_text(json.dumps(config))
    port, out = free_port(), tmp / "callgrind.out"
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"]
    command += [f"--callgrind-out-file={out}"]
    command += [sys.executable, "-m", "lamina.cli", "up", "--port", str(port)]
    command += ["--state-dir", str(tmp / "state"), "--config", str(tmp / "lamina.yaml")]
    with (tmp / "up.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            deadline = time.monotonic() + 1200
            while not _ready(client):
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the {mode} stack did not start:\n{(tmp / 'up.log').read_text()[-3000:]}")
                time.sleep(1)

            def send(n: int) -> None:
                text = f"{n} {PROMPT}"
                body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": stream}
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    response.read()
                    assert response.status_code == 200, response.text

            for n in range(100):
                send(n)
            _callgrind(proc.pid, "-i", "on")
            _callgrind(proc.pid, "-z")
            started = time.monotonic()
            time.sleep(idle_s)
            _callgrind(proc.pid, "-d")
            idle_wall, started = time.monotonic() - started, time.monotonic()
            for n in range(100, 100 + requests):
                send(n)
            _callgrind(proc.pid, "-d")
            load_wall = time.monotonic() - started
            _callgrind(proc.pid, "-i", "off")
    finally:
        proc.terminate()
        proc.wait(120)
    idle, load = _dumped(out, 1), _dumped(out, 2)
    main, others = ((load[i] - idle[i] / idle_wall * load_wall) / requests for i in (0, 1))
    return {"main": main, "others": others, "raw": sum(load) / requests, "wall_s": load_wall}


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def http_main(requests: int, stream: bool, idle_s: float) -> None:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lamina-tracing-http-") as tmp:

        def run(mode: str) -> None:
            results[mode] = http_count(mode, Path(tmp) / mode, requests, stream, idle_s)

        threads = [threading.Thread(target=run, args=(mode,)) for mode in ("off", "on")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if len(results) < 2:
        sys.exit("a stack failed (above)")
    kind = "streamed" if stream else "plain"
    print(f"{kind} chat requests over HTTP, {requests} counted per stack, gateway instructions per request:")
    off, on = results["off"], results["on"]
    for figure, label in (
        ("main", "event loop, less its idle rate"),
        ("others", "other threads, less their idle rate"),
        ("raw", "whole process, raw"),
    ):
        added = on[figure] - off[figure]
        share = f"({added / off['main']:+.1%} of the event loop's)" if figure != "raw" else ""
        print(
            f"  {label:36s} off {off[figure] / 1000:9,.1f} k  on {on[figure] / 1000:9,.1f} k  "
            f"added {added / 1000:7,.1f} k {share}"
        )
    print(
        f"  {requests} requests in {off['wall_s']:.0f} s (off) and {on['wall_s']:.0f} s (on) under valgrind"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1024, help="requests counted per mode")
    ap.add_argument("--stream", action="store_true", help="streamed chat requests")
    ap.add_argument("--http", action="store_true", help="count `lamina up` gateways served over HTTP")
    ap.add_argument("--idle-s", type=float, default=20.0, help="--http: seconds each gateway is counted idle")
    ap.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.http:
        http_main(args.requests, args.stream, args.idle_s)
        return
    if args.child:
        child(args.child, args.requests, args.stream)
        return
    procs = {}
    for mode in ("off", "on"):
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            mode,
            "--requests",
            str(args.requests),
            *(["--stream"] if args.stream else []),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        procs[mode] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    per: dict[str, float] = {}
    for mode, proc in procs.items():
        out = proc.communicate()[0].decode(errors="replace")
        found = re.search(r"Collected : (\d+)", out)
        if proc.returncode or found is None:
            sys.exit(f"the {mode} run failed:\n{out[-3000:]}")
        per[mode] = int(found.group(1)) / args.requests
    added = per["on"] - per["off"]
    kind = "streamed" if args.stream else "plain"
    print(f"{kind} chat requests, {args.requests} counted per mode, instructions per request:")
    print(f"  off {per['off'] / 1000:,.1f} k   on {per['on'] / 1000:,.1f} k")
    print(f"  tracing, breakdown and metrics add {added / 1000:,.1f} k ({added / per['off']:+.1%})")


if __name__ == "__main__":
    main()
