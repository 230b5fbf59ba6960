"""The gateway's own overhead with its policies on, next to LiteLLM's proxy on the same fake upstream.

    bench/litellm_venv.sh                  # once: LiteLLM's proxy in its own virtualenv (build/litellm-venv)
    apt-get install wrk                    # the load generator (C, so the client costs little CPU)
    .venv/bin/python bench/gateway_overhead.py [--seconds 10] [--soak 100000] [--policies all|none]

In one run on this machine, three targets answer the same chat request (non-streamed, 8 tokens):

- direct: a Lamina replica worker process with the fake engine (no gateway): the baseline;
- Lamina: `lamina up` whose deployment is the same fake engine in its own worker, with every policy on
  (`--policies all`: a key from the key store, rate limits per key, model and global, input guards, the
  cost policy with a budget) or none;
- LiteLLM: its proxy (one worker process) forwarding to the direct worker as an OpenAI upstream.

For each: requests per second, p50 and p99 latency at 1 and at 16 concurrent connections (wrk), the
latency each gateway adds over the direct worker at the same concurrency, and the CPU time of the gateway
process per request (its own process only: for Lamina without its replica, for LiteLLM without the
upstream). Then a soak: ``--soak`` requests through Lamina at 16 connections, the gateway's RSS sampled as
they go (flat memory is the target). Results as a table and as JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support import free_port, start_stack, stop_stack  # noqa: E402

LITELLM = ROOT / "build" / "litellm-venv" / "bin" / "litellm"
MODEL = "fake"
TOKENS = ["Hello", " from", " the", " fake", " engine", " of", " Lamina", "."]
PROMPT = (
    "Summarise the following note for a colleague in two sentences: the quarterly review moved to "
    "Thursday at ten, the budget figures are due the day before, and the new dashboard goes live next week."
)


@dataclass
class Load:
    """One wrk run."""

    connections: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_s: float

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_s * 1000 / max(self.requests, 1)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url: str, key: str | None, connections: int, seconds: float, proc: psutil.Process | None) -> Load:
    """``connections`` keep-alive clients posting the chat request for ``seconds``; ``proc``'s CPU time."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\n')
        head, tail = json.dumps(body).split(PROMPT)
        script.write(f"local head, tail, n = {json.dumps(head)}, {json.dumps(tail)}, 0\n")
        script.write('wrk.headers["Content-Type"] = "application/json"\n')
        if key:
            script.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
        # each request its own text: no cache answers it, every guard reads new text
        script.write("request = function()\n  n = n + 1\n")
        script.write(
            f"  return wrk.format(nil, nil, nil, head .. n .. {json.dumps(' ' + PROMPT)} .. tail)\nend\n"
        )
    threads = 1 if connections == 1 else 2
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{round(seconds)}s",
        "--latency",
        "-s",
        script.name,
        url,
    ]
    before = _cpu(proc)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    cpu = _cpu(proc) - before
    Path(script.name).unlink()
    dist = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    total = re.search(r"(\d+) requests in ([\d.]+)(s|m)", out)
    if total is None or set(dist) != {"50", "99"}:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    requests = int(total.group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = int(errors.group(1)) if errors else 0
    failed += sum(int(g) for g in socket_errors.groups()) if socket_errors else 0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return Load(connections, requests, seconds, rps, _ms(dist["50"]), _ms(dist["99"]), failed, cpu)


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    times = proc.cpu_times()
    return times.user + times.system


def _wait(url: str, timeout_s: float = 120.0, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s} s")


@contextmanager
def fake_worker(tmp: Path) -> Iterator[str]:
    """A replica worker with the fake engine, as the upstream of LiteLLM and the direct baseline."""
    port = free_port()
    spec = {"served_name": MODEL, "engine": "fake", "options": {"mode": "replay", "tokens": TOKENS}}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "worker.json"
    path.write_text(json.dumps(spec))
    argv = [sys.executable, "-m", "lamina.models._worker", "--port", str(port), "--spec", str(path)]
    argv.append("--no-secret")  # LiteLLM and the baseline call it directly
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def litellm(tmp: Path, upstream: str) -> Iterator[tuple[str, psutil.Process, str]]:
    """LiteLLM's proxy with its master key (its auth on; it refuses to start without one), offline."""
    port, key = free_port(), "sk-bench-" + "0" * 32
    config = tmp / "litellm.yaml"
    model = {"model": f"openai/{MODEL}", "api_base": f"{upstream}/v1", "api_key": "none"}
    listed = {"model_list": [{"model_name": MODEL, "litellm_params": model}]}
    config.write_text(json.dumps({**listed, "general_settings": {"master_key": key}}))
    log = (tmp / "litellm.log").open("wb")
    argv = [str(LITELLM), "--config", str(config), "--port", str(port), "--num_workers", "1"]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no download of its price list
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait(f"http://127.0.0.1:{port}/health/liveliness", timeout_s=180)
        yield f"http://127.0.0.1:{port}", psutil.Process(proc.pid), key
    finally:
        proc.terminate()
        proc.wait(20)


def lamina_config(policies: str) -> dict[str, Any]:
    deployment = {"name": MODEL, "engine": "fake", "options": {"fake": {"mode": "replay", "tokens": TOKENS}}}
    config: dict[str, Any] = {"register_bundled": False, "deployments": [deployment]}
    config["observability"] = {"store_spans": True}
    if policies == "all":
        config.update(POLICIES)
    return config


#: every policy on, with limits far above what the bench sends (nothing is refused, everything is checked):
#: rate limits per key (the key's own), per model and global; a global budget (and the key's); input guards
#: (PII, injection with its classifier on suspicious texts, toxicity); the cost policy prices each answer
BIG = 10**9
POLICIES: dict[str, Any] = {
    "rate_limits": {"rpm": BIG, "tpm": BIG, "per_model": {MODEL: {"rpm": BIG, "tpm": BIG}}},
    "costs": {"budget_usd": 1_000_000.0, "budget_period": "day"},
    "guards": {"input": [{"kind": "pii", "action": "redact"}, {"kind": "injection"}, {"kind": "toxicity"}]},
}


def create_key(state: Path) -> str:
    """A user key limited to the bench's model, with its own rate limits and budget (from the key store)."""
    argv = [sys.executable, "-m", "lamina.cli", "keys", "create", "--name", "bench", "--models", MODEL]
    argv += [
        "--rpm",
        str(BIG),
        "--tpm",
        str(BIG),
        "--budget",
        "1000000/day",
        "--json",
        "--state-dir",
        str(state),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return str(json.loads(out)["secret"])


@contextmanager
def lamina(tmp: Path, policies: str) -> Iterator[tuple[str, psutil.Process, str | None]]:
    key = create_key(tmp / "state") if policies == "all" else None
    stack = start_stack(tmp, json.dumps(lamina_config(policies)))
    try:
        yield stack.base_url, psutil.Process(stack.proc.pid), key
    finally:
        stop_stack(stack)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each wrk run")
    ap.add_argument("--soak", type=int, default=100_000, help="requests through Lamina for the memory check")
    ap.add_argument("--policies", choices=["all", "none"], default="all")
    ap.add_argument("--skip-litellm", action="store_true")
    args = ap.parse_args()
    result: dict[str, Any] = {"machine": _machine(), "args": vars(args), "targets": {}}
    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        upstream = stack.enter_context(fake_worker(tmp / "direct"))
        targets: dict[str, tuple[str, psutil.Process | None, str | None]] = {"direct": (upstream, None, None)}
        (tmp / "lamina").mkdir()
        url, proc, key = stack.enter_context(lamina(tmp / "lamina", args.policies))
        targets["lamina"] = (url, proc, key)
        if not args.skip_litellm:
            (tmp / "litellm").mkdir()
            targets["litellm"] = stack.enter_context(litellm(tmp / "litellm", upstream))
        for url, _, key in targets.values():  # warm up: imports, connection pools, caches
            wrk(f"{url}/v1/chat/completions", key, 4, 2, None)
        for connections in (1, 16):
            for name, (url, proc, key) in targets.items():
                load = wrk(f"{url}/v1/chat/completions", key, connections, args.seconds, proc)
                result["targets"].setdefault(name, {})[str(connections)] = asdict(load) | {
                    "cpu_ms_per_request": load.cpu_ms_per_request
                }
                print(
                    f"{name:8s} c={connections:2d} {load.rps:8.1f} req/s  p50 {load.p50_ms:6.2f} ms  p99 "
                    f"{load.p99_ms:6.2f} ms  cpu {load.cpu_ms_per_request:6.2f} ms/req  err {load.errors}"
                )
        url, proc, key = targets["lamina"]
        assert proc is not None
        result["soak"] = soak(f"{url}/v1/chat/completions", key, proc, args.soak)
    print(report(result))
    out = ROOT / "bench" / "results" / f"gateway_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out.relative_to(ROOT)}")


def soak(url: str, key: str | None, proc: psutil.Process, total: int) -> list[dict[str, float]]:
    """``total`` requests at 16 connections in rounds; the gateway's RSS after each."""
    samples = [{"requests": 0, "rss_mb": proc.memory_info().rss / 2**20}]
    done = 0
    while done < total:
        load = wrk(url, key, 16, 10, None)
        done += load.requests
        samples.append({"requests": done, "rss_mb": proc.memory_info().rss / 2**20, "errors": load.errors})
        print(f"soak: {done} requests, RSS {samples[-1]['rss_mb']:.1f} MiB")
    return samples


def report(result: dict[str, Any]) -> str:
    targets = result["targets"]
    lines = [
        "",
        "| | connections | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | gateway CPU ms/req |",
    ]
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, levels in targets.items():
        for connections, load in levels.items():
            base = targets["direct"][connections]
            added = "" if name == "direct" else f"{load['p50_ms'] - base['p50_ms']:.2f}"
            added99 = "" if name == "direct" else f"{load['p99_ms'] - base['p99_ms']:.2f}"
            cpu = "" if name == "direct" else f"{load['cpu_ms_per_request']:.2f}"
            lines.append(
                f"| {name} | {connections} | {load['rps']:.0f} | {load['p50_ms']:.2f} | "
                f"{load['p99_ms']:.2f} | {added} | {added99} | {cpu} |"
            )
    if "litellm" in targets:
        ratio = targets["lamina"]["16"]["rps"] / targets["litellm"]["16"]["rps"]
        lines.append(f"\nLamina / LiteLLM requests per second at 16 connections: {ratio:.1f}x")
    soak = result.get("soak") or []
    if soak:
        lines.append(
            f"RSS of the Lamina gateway: {soak[1]['rss_mb']:.1f} MiB after {soak[1]['requests']} requests, "
            f"{soak[-1]['rss_mb']:.1f} MiB after {soak[-1]['requests']}"
        )
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    return {
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    main()
