"""Eight sentences embedded by one replica: in one request, by eight concurrent clients, one after another.

    .venv/bin/python bench/embed_concurrency.py [--rounds 15] [--threads N]

A real replica worker process of the bundled all-MiniLM-L6-v2 (int8 ONNX), started the way
tests/integration/test_worker.py starts one, is reached over loopback HTTP by httpx. Each round runs the
three shapes in turn, rotating which goes first so that drift of the machine hits all of them:

- one request carrying the 8 sentences;
- 8 concurrent clients (one connection each, already open) sending one sentence each;
- the same 8 one-sentence requests one after another.

Printed: the median of each over the rounds, and the ratio concurrent / one request (the median of the
per-round ratios, with its range). The replica batches requests that arrive together (micro-batching),
so the target is concurrent <= 1.6x one request. Not a test: run by hand, results go in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import free_port, minilm_spec

MODEL = "minilm-l6-v2"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
]


def start_worker(directory: Path, threads: int | None) -> tuple[subprocess.Popen[bytes], str]:
    """A replica worker of the bundled MiniLM on a free port, returned once /health answers 200."""
    load = minilm_spec(**({"intra_op_threads": threads} if threads else {}))
    assert load.path is not None
    spec = {
        "served_name": MODEL,
        "engine": "onnx",
        "path": str(load.path),
        "extra_files": {role: str(p) for role, p in load.extra_files.items()},
        "options": load.options,
    }
    spec_path = directory / "minilm.json"
    spec_path.write_text(json.dumps(spec))
    port = free_port()
    cmd = [sys.executable, "-m", "lamina.models._worker", "--port", str(port), "--spec", str(spec_path)]
    cmd.append("--no-secret")  # the bench calls it directly
    log = (directory / "worker.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"worker exited with {proc.returncode}: {(directory / 'worker.log').read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    sys.exit("worker not ready after 120 s")


@dataclass(frozen=True)
class Reply:
    """What a shape's requests came back with: prompt tokens in all, and the engine calls that served them."""

    tokens: int
    calls: int


async def post(client: httpx.AsyncClient, texts: list[str]) -> tuple[int, int]:
    """Embed ``texts``: the prompt tokens the replica counted, and when its engine call started."""
    r = await client.post("/v1/embeddings", json={"model": MODEL, "input": texts})
    r.raise_for_status()
    body = r.json()
    return int(body["usage"]["prompt_tokens"]), int(body["lamina"]["start_ns"])


def reply(answers: list[tuple[int, int]]) -> Reply:
    return Reply(sum(tokens for tokens, _ in answers), len({start for _, start in answers}))


async def timed(run: Callable[[], Awaitable[Reply]]) -> tuple[float, Reply]:
    t0 = time.perf_counter()
    answer = await run()
    return time.perf_counter() - t0, answer


async def bench(url: str, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    one = httpx.AsyncClient(base_url=url, timeout=60)
    clients = [httpx.AsyncClient(base_url=url, timeout=60) for _ in SENTENCES]

    async def one_request() -> Reply:
        return reply([await post(one, SENTENCES)])

    async def concurrent() -> Reply:
        return reply(await asyncio.gather(*(post(c, [s]) for c, s in zip(clients, SENTENCES, strict=True))))

    async def sequential() -> Reply:
        return reply([await post(one, [s]) for s in SENTENCES])

    shapes = {"one request": one_request, "concurrent": concurrent, "one after another": sequential}
    times: dict[str, list[float]] = {name: [] for name in shapes}
    calls: dict[str, list[int]] = {name: [] for name in shapes}
    try:
        for run in shapes.values():  # warm-up: connections open, the model's first runs done
            await run()
            await run()
        names = list(shapes)
        for r in range(rounds):
            order = names[r % 3 :] + names[: r % 3]
            tokens = set()
            for name in order:
                seconds, answer = await timed(shapes[name])
                times[name].append(seconds)
                calls[name].append(answer.calls)
                tokens.add(answer.tokens)
            assert len(tokens) == 1, f"usage differs between shapes: {tokens}"
    finally:
        for c in [one, *clients]:
            await c.aclose()
    return times, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (its default)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_worker(Path(tmp), args.threads)
        try:
            times, calls = asyncio.run(bench(url, args.rounds))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"all-MiniLM-L6-v2 int8 ONNX, one replica worker, 8 sentences, {args.rounds} rounds; medians")
    print(f"{'':<20} {'ms':>8} {'engine calls':>13}")
    for name, seconds in times.items():
        print(f"{name:<20} {statistics.median(seconds) * 1000:>8.1f} {statistics.median(calls[name]):>13.1f}")
    ratios = [c / o for c, o in zip(times["concurrent"], times["one request"], strict=True)]
    print(
        f"ratio concurrent / one request: {statistics.median(ratios):.2f} "
        f"[min {min(ratios):.2f}, max {max(ratios):.2f}]  target <= 1.6"
    )


if __name__ == "__main__":
    main()
