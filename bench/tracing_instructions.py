"""What tracing, the breakdown and the metrics cost the gateway, counted in CPU instructions (deterministic).

    apt-get install valgrind
    .venv/bin/python bench/tracing_instructions.py [--requests 1024] [--stream]

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
- the breakdown's texts come from a table of the numbers under 10 ms (a real request's), which times 50
  times longer miss: the table is filled up to 1,000 ms with the same texts beforehand.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(mode: str, requests: int, stream: bool) -> None:
    """One counted run (under valgrind)."""
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    import anyio
    import httpx
    from tracing_overhead import CHAT, EMBED, GatewayDeps, ReplayDispatcher, StaticCatalog, create_app

    from lamina.observability import Telemetry, _breakdown
    from lamina.stack.gateway import settle_garbage_collector

    telemetry = Telemetry(service_name="bench", tracing=mode == "on", metrics=mode == "on")
    if mode == "on":
        telemetry.keeper.sampler.decide = lambda **_: None  # type: ignore[method-assign]
        size = 1_000_000  # microseconds: up to 1,000 ms
        _breakdown._TEXTS = _breakdown._TEXTS + [None] * (size - _breakdown._TABLE)
        _breakdown._TABLE = size
        for us in range(size):
            _breakdown._text(us)

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1024, help="requests counted per mode")
    ap.add_argument("--stream", action="store_true", help="streamed chat requests")
    ap.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = ap.parse_args()
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
