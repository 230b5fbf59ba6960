"""Eight streams of SmolLM2 while other processes use the CPUs: Lamina with llama.cpp's threads pinned
(``gguf.pin_threads``, its default when the threads are as many as the cores) and unpinned, and
llama-server, each quiet and beside ``--busy`` busy loops (niced, as a batch job runs).

    bench/llama_tools.sh      # once (see bench/serve_concurrency.py); without it llama-server is left out
    .venv/bin/python bench/serve_contention.py [--seconds 12] [--busy 2] [--rounds 2] [--nice 10]

Every system runs the Q8_0 file of what `lamina up` serves by default (made with ``lamina models
quantize``), with bench/serve_concurrency.py's settings (2 threads, 8 slots, greedy, 96 tokens) and its
lean SSE client: waves of eight streams for ``--seconds``, aggregate generation tokens/s. The systems and
the two conditions alternate, ``--rounds`` times. Not a test: run by hand, the figures go in the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_concurrency as sc
from tests.support import smollm2_path

from lamina.models._quantize import quantize_file


@contextmanager
def busy_loops(n: int, nice: int) -> Iterator[None]:
    loops = [subprocess.Popen(["nice", "-n", str(nice), "sh", "-c", "while :; do :; done"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in loops:
            p.kill()
            p.wait()


def waves(url: str, s: sc.Settings, seconds: float) -> float:
    """Waves of eight streams for ``seconds``: aggregate tokens/s."""
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=32)) as client:
        run = sc.over_http_sse(client, url, s)
        run("warm up")
        with ThreadPoolExecutor(8) as pool:
            t0, tokens, i = time.perf_counter(), 0, 0
            while time.perf_counter() - t0 < seconds:
                streams = list(pool.map(run, [f"({i}) {p}" for p in sc.PROMPTS[:8]]))
                tokens += sum(x.tokens for x in streams)
                i += 1
            return tokens / (time.perf_counter() - t0)


def lamina(pin: bool, s: sc.Settings, tmp: Path) -> Callable[[float], float]:
    def measure(seconds: float) -> float:
        config = json.loads(sc.lamina_config(s)[0])
        config["deployments"][0]["options"]["gguf"]["pin_threads"] = pin
        folder = Path(tempfile.mkdtemp(dir=tmp))
        add = [sys.executable, "-m", "lamina.cli", "models", "add", s.model, "--name", "bench-model"]
        subprocess.run([*add, "--state-dir", str(folder / "state")], check=True, capture_output=True)
        stack = sc.start_stack(folder, json.dumps(config))
        try:
            return waves(f"{stack.base_url}/v1", s, seconds)
        finally:
            sc.stop_stack(stack)

    return measure


def llama_server(binary: Path, s: sc.Settings, tmp: Path) -> Callable[[float], float]:
    def measure(seconds: float) -> float:
        with sc.llama_server(binary, Path(tempfile.mkdtemp(dir=tmp)), s) as url:
            return waves(url, s, seconds)

    return measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=12)
    ap.add_argument("--busy", type=int, default=2, help="busy loops beside the server")
    ap.add_argument("--nice", type=int, default=10, help="their nice value")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--llama-bin", help="folder of the llama.cpp tools (default: build/llama-tools)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        q8 = tmp / "smollm2-q8_0.gguf"
        quantize_file(smollm2_path(), "gguf-q8_0", q8)
        s = sc.Settings(2, 4096, 512, 8, 96, 1234, flash_attn=False, model=str(q8))
        systems: dict[str, Callable[[float], float]] = {
            "lamina, pinned": lamina(True, s, tmp),
            "lamina, unpinned": lamina(False, s, tmp),
        }
        try:
            systems["llama-server"] = llama_server(sc.find_tools(args.llama_bin)[0], s, tmp)
        except (RuntimeError, SystemExit, FileNotFoundError) as exc:
            print(f"llama-server left out: {exc}", file=sys.stderr)
        results: dict[str, dict[str, list[float]]] = {n: {"quiet": [], "busy": []} for n in systems}
        for r in range(args.rounds):
            for name, measure in systems.items():
                for condition in ("quiet", "busy") if r % 2 == 0 else ("busy", "quiet"):
                    if condition == "busy":
                        with busy_loops(args.busy, args.nice):
                            tps = measure(args.seconds)
                    else:
                        tps = measure(args.seconds)
                    results[name][condition].append(tps)
                    print(f"round {r + 1}: {name}, {condition}: {tps:.1f} t/s", file=sys.stderr, flush=True)
    report(results, args)


def report(results: dict[str, dict[str, list[float]]], args: Any) -> None:
    print(f"8 streams, tokens/s (median of {args.rounds}); busy: {args.busy} loops at nice {args.nice}")
    print(f"{'':<20} {'quiet':>8} {'busy':>8} {'busy / quiet':>13}")
    for name, r in results.items():
        quiet, busy = statistics.median(r["quiet"]), statistics.median(r["busy"])
        print(f"{name:<20} {quiet:>8.1f} {busy:>8.1f} {busy / quiet:>13.2f}")


if __name__ == "__main__":
    main()
