"""Concurrent streams of SmolLM2 through Lamina next to llama.cpp's own server and batched decode.

    bench/llama_tools.sh      # once: builds llama-server and llama-batched-bench (minutes on 2 cores)
    .venv/bin/python bench/serve_concurrency.py [--rounds 2] [--single-runs 3] [--max-tokens 96]

In one run, on the bundled SmolLM2-135M-Instruct as `lamina up` serves it by default (its ``@serving``
version: the Q8_0 variant the stack makes of the Q4_1 file it ships, whose file every system then gets;
``--shipped``: the Q4_1 file itself), with the same llama.cpp settings everywhere (threads, context per
sequence, batch size, weight repacking off, flash attention off unless asked):

- llama-cpp-python in-process: single-stream generation tokens/s (the reference for the 0.9 target);
- Lamina: a real `lamina up` process with one GGUF replica, reached over loopback HTTP, streaming, by a
  lean server-sent-events reader (``--client openai``: the official openai client, which takes about
  three times the CPU a token from the machine the servers run on); the deployment gets `gguf.parallel`
  when the installed engine has that option;
- llama-server built from the llama.cpp that llama-cpp-python vendors (bench/llama_tools.sh), with the
  same parallel slots (--ctx-size n_ctx x parallel, which it divides among them) and continuous
  batching, reached by the same client code;
- llama-batched-bench (32-token prompts, 96 generated): the limit of batched decode on this machine.

``--model FILE`` runs every system on another GGUF file instead (Lamina registers it first), e.g. the
same model quantized otherwise (``lamina models quantize``), to see what its weight type does to batching.

For Lamina and llama-server: single-stream tokens/s, and for 1, 2, 4, 8 and 16 concurrent streams the
aggregate generation tokens/s (completion tokens from each stream's usage over the wall time from the
first request to the last stream's end) and the time to first token, p50 and p95 over all streams of the
level. Every stream asks a different prompt written to get a long answer, greedily, with max_tokens
fixed; the OpenAI API has no ignore_eos, so tokens are counted, not assumed. No text is sent twice to one
system (a tag starts each), so no prompt cache serves a whole prompt; the systems get the same texts.
Systems alternate: single streams A B C, C A B, ...; each concurrency level runs on both servers back to
back, the order rotating. Then ``--pairs`` times per system, a wave of one stream and one of eight back to
back (the order alternating): the median of those pairs' 8 / 1 ratios, and of Lamina / llama-server at 8
streams, is the paired figure, less moved by the machine's drift than the ratio of two levels' medians.
On a shared machine every measurement waits for idle CPUs and is taken again when other processes ran
meanwhile (see ``Machine``); the report says how often.
Printed as a table; the whole run is written as JSON to bench/results/. Not a test: run by hand, the
figures go in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import free_port, smollm2_path, start_stack, stop_stack

from lamina.models._gguf import model_params_with_extra_bufts

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
#: the registry name of a ``--model`` file
_REGISTERED = "bench-model"
LEVELS = (1, 2, 4, 8, 16)
RESULTS = ROOT / "bench" / "results"
TOOLS_ENV = "LLAMA_TOOLS_BIN"
DEFAULT_TOOLS = ROOT / "build" / "llama-tools"
#: Sixteen different requests, each written to get an answer longer than max_tokens.
PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works, step by step.",
    "Write a long letter from a sailor to his family about a storm at sea.",
    "Describe a busy medieval market town from morning to night.",
    "Write a detailed guide to growing tomatoes in a small garden.",
    "Tell a long fairy tale about a fox, a crow and a golden key.",
    "Explain the water cycle to a ten-year-old, with many examples.",
    "Write a long diary entry of an astronaut on her first day on Mars.",
    "Describe the history of the bicycle, from its invention to today.",
    "Write a long adventure story about two friends lost in a forest.",
    "Explain how to plan a week-long hiking trip, covering everything.",
    "Write a detailed description of a lighthouse and its keeper's life.",
    "Tell a long story about a robot who wants to become a painter.",
    "Explain how bees make honey and why they matter, in detail.",
    "Write a long speech for the opening of a new public library.",
    "Describe a journey by train across a snowy mountain range.",
]


@dataclass(frozen=True)
class Settings:
    """What every system runs with; one object so that no side can drift from the others."""

    threads: int
    n_ctx: int  # per sequence: each of the `parallel` slots gets its own (as in Lamina's engine)
    n_batch: int
    parallel: int
    max_tokens: int
    seed: int
    flash_attn: bool
    #: a GGUF file for every system ("": the file of what `lamina up` serves by default, the bundled
    #: SmolLM2's ``@serving`` version, once the Lamina stack has made it)
    model: str = ""


def model_path(s: Settings) -> Path:
    return Path(s.model) if s.model else smollm2_path()


def served_file(state_dir: Path) -> tuple[str, str]:
    """The version the stack's default deployment serves (``NAME@serving``) and its file."""
    show = [sys.executable, "-m", "lamina.cli", "models", "show", f"{MODEL}@serving", "--json"]
    done = subprocess.run([*show, "--state-dir", str(state_dir)], check=True, capture_output=True, text=True)
    found = json.loads(done.stdout)
    return str(found["ref"]), str(found["path"])


@dataclass(frozen=True)
class Stream:
    tokens: int
    start: float
    ttft_s: float
    total_s: float
    clean: bool = True

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / max(self.total_s - self.ttft_s, 1e-9)

    @property
    def e2e_tps(self) -> float:
        return self.tokens / self.total_s


@dataclass(frozen=True)
class Wave:
    """Streams started together: their aggregate generation tokens/s and times to first token."""

    aggregate_tps: float
    ttfts_s: list[float]
    tokens: list[int]
    clean: bool

    @classmethod
    def of(cls, streams: list[Stream], clean: bool) -> Wave:
        t0 = min(s.start for s in streams)
        wall = max(s.start + s.total_s for s in streams) - t0
        tokens = [s.tokens for s in streams]
        return cls(sum(tokens) / wall, [s.start + s.ttft_s - t0 for s in streams], tokens, clean)


@dataclass
class Level:
    """The waves of one concurrency level on one system; summarized from the undisturbed ones."""

    streams: int
    waves: list[Wave] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        used = [w for w in self.waves if w.clean] or self.waves
        ttfts = [t for w in used for t in w.ttfts_s]
        return {
            "streams": self.streams,
            "aggregate_tps": statistics.median(w.aggregate_tps for w in used),
            "ttft_p50_s": _percentile(ttfts, 50),
            "ttft_p95_s": _percentile(ttfts, 95),
            "mean_tokens": statistics.fmean(t for w in used for t in w.tokens),
            "waves_used": len(used),
        }


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), so p95 of 8 values is not just the maximum."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --- the three servers and the in-process reference -------------------------------------------------


def gguf_options_fields() -> set[str]:
    from lamina.models import GGUFOptions

    return set(GGUFOptions.model_fields)


def lamina_config(s: Settings) -> tuple[str, dict[str, Any]]:
    """The stack's config, and the gguf options it passes (``parallel`` only where the engine has it)."""
    gguf: dict[str, Any] = {
        "n_threads": s.threads,
        "n_threads_batch": s.threads,
        "n_ctx": s.n_ctx,
        "n_batch": s.n_batch,
        "use_extra_bufts": False,
    }
    fields = gguf_options_fields()
    if "parallel" in fields:
        gguf["parallel"] = s.parallel
    if "flash_attn" in fields:
        gguf["flash_attn"] = s.flash_attn
    # a --model file is registered by lamina_stack under its own name; else what `lamina up` serves
    deployment: dict[str, Any] = {"name": MODEL, "engine": "gguf", "options": {"gguf": gguf}}
    deployment["model"] = _REGISTERED if s.model else f"{MODEL}@serving"
    config = {"register_bundled": not s.model, "deployments": [deployment]}
    return json.dumps(config), gguf  # JSON is YAML


@contextmanager
def lamina_stack(tmp: Path, s: Settings) -> Iterator[str]:
    config, _ = lamina_config(s)
    if s.model:
        add = [sys.executable, "-m", "lamina.cli", "models", "add", s.model, "--name", _REGISTERED]
        subprocess.run([*add, "--state-dir", str(tmp / "state")], check=True, capture_output=True)
    stack = start_stack(tmp, config)
    try:
        yield f"{stack.base_url}/v1"
    finally:
        stop_stack(stack)


def _argv(binary: Path, flags: dict[str, object], *switches: str) -> list[str]:
    return [str(binary), *(str(x) for kv in flags.items() for x in kv), *switches]


def _llama_flags(s: Settings, n_ctx: int) -> dict[str, object]:
    """The llama.cpp settings both tools share with Lamina's engine and the in-process reference."""
    return {
        "--model": model_path(s),
        "--threads": s.threads,
        "--threads-batch": s.threads,
        "--ctx-size": n_ctx,
        "--batch-size": s.n_batch,
        "--ubatch-size": s.n_batch,
        "--flash-attn": "on" if s.flash_attn else "off",
        "--n-gpu-layers": 0,
    }


def llama_server_argv(binary: Path, port: int, s: Settings) -> list[str]:
    # llama-server divides --ctx-size among its slots; Lamina gives each slot n_ctx
    flags = _llama_flags(s, s.n_ctx * s.parallel) | {
        "--alias": MODEL,
        "--host": "127.0.0.1",
        "--port": port,
        "--parallel": s.parallel,
    }
    return _argv(binary, flags, "--cont-batching", "--no-repack", "--no-webui")


@contextmanager
def llama_server(binary: Path, tmp: Path, s: Settings, timeout_s: float = 120.0) -> Iterator[str]:
    port = free_port()
    log_path = tmp / "llama-server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(llama_server_argv(binary, port, s), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"llama-server exited with {proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"llama-server not ready after {timeout_s} s:\n{tail}")
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def in_process(s: Settings) -> Callable[[str], Stream]:
    """llama-cpp-python in this process; tokens are the streamed content chunks (one token each)."""
    from llama_cpp import Llama

    with model_params_with_extra_bufts(False):
        llm = Llama(
            model_path=str(model_path(s)),
            n_ctx=s.n_ctx,
            flash_attn=s.flash_attn,
            n_batch=s.n_batch,
            n_threads=s.threads,
            n_threads_batch=s.threads,
            verbose=False,
        )

    def run(prompt: str) -> Stream:
        t0 = time.perf_counter()
        ttft, n = 0.0, 0
        chunks = llm.create_chat_completion(
            [{"role": "user", "content": prompt}],
            max_tokens=s.max_tokens,
            temperature=0,
            seed=s.seed,
            stream=True,
        )
        for chunk in chunks:
            if chunk["choices"][0]["delta"].get("content"):  # type: ignore[index,union-attr]
                n += 1
                ttft = ttft or time.perf_counter() - t0
        return Stream(n, t0, ttft, time.perf_counter() - t0)

    return run


def _request(prompt: str, s: Settings) -> dict[str, Any]:
    """What every stream asks, whichever client sends it: greedy, ``max_tokens``, usage in the last event."""
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": s.max_tokens,
        "temperature": 0,
        "seed": s.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def over_http_sse(client: httpx.Client, base_url: str, s: Settings) -> Callable[[str], Stream]:
    """One streamed chat completion read as server-sent events with ``httpx`` and ``json.loads`` per event (as
    vLLM's benchmark_serving reads them): about a third of the openai client's CPU per token, which on a
    2-core machine is taken from the server being measured (the openai client's 360-390 us a token at 8
    streams against 120-140, and 700 against 300 at 1, measured on 2 December)."""

    def run(prompt: str) -> Stream:
        body = {"model": MODEL, **_request(prompt, s)}
        t0 = time.perf_counter()
        ttft, chunks, usage = 0.0, 0, None
        with client.stream("POST", f"{base_url}/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue  # blank separators, comments, [DONE]
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
                choices = event.get("choices")
                if choices and choices[0]["delta"].get("content"):
                    chunks += 1
                    ttft = ttft or time.perf_counter() - t0
        return Stream(usage if usage is not None else chunks, t0, ttft, time.perf_counter() - t0)

    return run


def over_http(client: openai.OpenAI, s: Settings) -> Callable[[str], Stream]:
    """One streamed chat completion; tokens from the usage chunk (content chunks if there is none)."""

    def run(prompt: str) -> Stream:
        t0 = time.perf_counter()
        ttft, chunks, usage = 0.0, 0, None
        stream = client.chat.completions.create(model=MODEL, **_request(prompt, s))
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                ttft = ttft or time.perf_counter() - t0
        return Stream(usage if usage is not None else chunks, t0, ttft, time.perf_counter() - t0)

    return run


# --- the measurements -------------------------------------------------------------------------------


def prompt(tag: str, i: int) -> str:
    """Prompt ``i`` made unique by ``tag``, written first so that only the chat template's own prefix can
    be served from a prompt cache: every system sees each text once, as from a new user."""
    return f"Request {tag}. {PROMPTS[i % len(PROMPTS)]}"


def wave(pool: ThreadPoolExecutor, run: Callable[[str], Stream], n: int, tag: str) -> list[Stream]:
    """``n`` streams started together (a barrier), each with its own prompt."""
    barrier = threading.Barrier(n)

    def one(i: int) -> Stream:
        barrier.wait()
        return run(prompt(f"{tag}.{i}", i))

    return list(pool.map(one, range(n)))


class Machine:
    """Measurements kept only while no other process used the CPUs, for a shared machine.

    llama.cpp's threads meet at a barrier after every operation, so with as many threads as cores, a
    second busy process (a test suite) does not cost its share of the speed but most of it. Before each
    measurement ``measure`` waits (up to ``max_wait_s``) for the CPUs to go idle; after it, it compares
    the machine's busy CPU time with that of this process tree (the bench, `lamina up` and its replica,
    llama-server) and measures again, up to ``attempts`` times, when other processes used more than
    ``max_foreign`` cores on average.
    """

    def __init__(self, max_wait_s: float, max_foreign: float = 0.15, attempts: int = 4) -> None:
        self.max_wait_s, self.max_foreign, self.attempts = max_wait_s, max_foreign, attempts
        self.waited_s = 0.0
        self.redone: list[str] = []
        self.disturbed: list[str] = []

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        t = psutil.cpu_times()
        # steal: time the hypervisor gave this VM's CPUs to other guests, as foreign as a local process
        busy = t.user + t.nice + t.system + sum(getattr(t, f, 0.0) for f in ("irq", "softirq", "steal"))
        me = psutil.Process()
        ours = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                pt = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            ours += pt.user + pt.system + pt.children_user + pt.children_system
        return time.monotonic(), float(busy), ours

    def _settle(self) -> None:
        """Return once the CPUs are under 10% busy over a second (our servers are idle meanwhile)."""
        deadline = time.monotonic() + self.max_wait_s
        while psutil.cpu_percent(interval=1.0) > 10 and time.monotonic() < deadline:
            self.waited_s += 1.0

    def measure(self, what: str, fn: Callable[[], T]) -> tuple[T, bool]:
        """``fn()``, and whether it ran undisturbed (else the last of ``attempts`` disturbed tries)."""
        for attempt in range(1, self.attempts + 1):
            self._settle()
            t0, busy0, ours0 = self._sample()
            value = fn()
            t1, busy1, ours1 = self._sample()
            foreign = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (t1 - t0)
            if foreign <= self.max_foreign:
                return value, True
            log(f"  {what}: other processes used {foreign:.2f} cores meanwhile (attempt {attempt})")
            self.redone.append(what)
        self.disturbed.append(what)
        return value, False


def single_streams(
    runs: dict[str, Callable[[str], Stream]], n: int, machine: Machine
) -> dict[str, list[Stream]]:
    """``n`` single streams on each system, the order rotating: A B C, C A B, B C A, ..."""
    names = list(runs)
    out: dict[str, list[Stream]] = {name: [] for name in names}
    for r in range(n):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            text = prompt(f"s{r}", r)
            stream, clean = machine.measure(f"single {r + 1} {name}", partial(runs[name], text))
            out[name].append(replace(stream, clean=clean))
    return out


def concurrency(
    runs: dict[str, Callable[[str], Stream]], rounds: int, machine: Machine
) -> dict[str, dict[int, Level]]:
    names = list(runs)
    out = {name: {n: Level(n) for n in LEVELS} for name in names}
    with ThreadPoolExecutor(max(LEVELS)) as pool:
        for r in range(rounds):
            for i, n in enumerate(LEVELS):
                k = (r + i) % len(names)
                for name in names[k:] + names[:k]:
                    what = f"round {r + 1} {name} {n} streams"
                    streams, clean = machine.measure(what, partial(wave, pool, runs[name], n, f"c{r}.{n}"))
                    out[name][n].waves.append(Wave.of(streams, clean))
                    log(f"  {what}: {out[name][n].waves[-1].aggregate_tps:.1f} t/s")
    return out


def paired(
    runs: dict[str, Callable[[str], Stream]], pairs: int, machine: Machine
) -> dict[str, list[tuple[float, float]]]:
    """``pairs`` times, on each system in turn (the order rotating): one stream, then eight at once (or eight
    then one, alternately), back to back: the 8 / 1 ratio of one pair has seconds of the machine's drift
    in it, where the rounds' levels are half a minute or more apart."""
    names = list(runs)
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with ThreadPoolExecutor(8) as pool:
        for i in range(pairs):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                tps: dict[int, float] = {}
                for n in (1, 8) if i % 2 == 0 else (8, 1):
                    what = f"pair {i + 1} {name} {n} streams"
                    streams, _ = machine.measure(what, partial(wave, pool, runs[name], n, f"p{i}.{n}"))
                    tps[n] = Wave.of(streams, True).aggregate_tps
                out[name].append((tps[1], tps[8]))
                log(f"  pair {i + 1} {name}: {tps[8] / tps[1]:.2f}x ({tps[1]:.1f} and {tps[8]:.1f} t/s)")
    return out


def paired_summary(pairs: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """Per system, the median of the pairs' 8 / 1 ratios and their range; Lamina / llama-server at 8 streams,
    the median of the pairs' (the two systems' waves of one pair index ran back to back)."""
    out: dict[str, Any] = {}
    for name, got in pairs.items():
        ratios = [eight / one for one, eight in got]
        out[name] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "n": len(got),
        }
    if {"lamina", "llama-server"} <= set(pairs):
        versus = [a[1] / b[1] for a, b in zip(pairs["lamina"], pairs["llama-server"], strict=True)]
        out["lamina_vs_server_at_8"] = {
            "median": statistics.median(versus),
            "min": min(versus),
            "max": max(versus),
        }
    return out


_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 6)
_COLS = ("pp", "tg", "b", "n_kv", "t_pp_s", "s_pp_tps", "t_tg_s", "s_tg_tps", "t_s", "s_tps")


def parse_batched_bench(text: str) -> list[dict[str, float]]:
    """The rows of llama-batched-bench's markdown table."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            rows.append({c: float(v) for c, v in zip(_COLS, m.groups(), strict=True)})
    return rows


def batched_bench(binary: Path, s: Settings, prompt: int) -> tuple[list[dict[str, float]], str]:
    n_ctx = max(s.n_ctx, max(LEVELS) * (prompt + s.max_tokens))
    flags = _llama_flags(s, n_ctx) | {
        "-npp": prompt,
        "-ntg": s.max_tokens,
        "-npl": ",".join(map(str, LEVELS)),
    }
    argv = _argv(binary, flags, "--no-repack")
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    table = "\n".join(line for line in done.stdout.splitlines() + done.stderr.splitlines() if "|" in line)
    return parse_batched_bench(table), table


def find_tools(explicit: str | None) -> tuple[Path, Path]:
    """llama-server and llama-batched-bench: --llama-bin, $LLAMA_TOOLS_BIN, or bench/llama_tools.sh's."""
    candidates = [Path(d) for d in (explicit, os.environ.get(TOOLS_ENV)) if d]
    candidates += sorted(DEFAULT_TOOLS.glob("build-*/bin"), reverse=True)
    for d in candidates:
        server, bench = d / "llama-server", d / "llama-batched-bench"
        if server.is_file() and bench.is_file():
            return server, bench
    found = shutil.which("llama-server"), shutil.which("llama-batched-bench")
    if found[0] and found[1]:
        return Path(found[0]), Path(found[1])
    sys.exit(f"llama-server / llama-batched-bench not found; run bench/llama_tools.sh or set {TOOLS_ENV}")


# --- the report -------------------------------------------------------------------------------------


def _single_summary(streams: list[Stream], reference: list[Stream] | None) -> dict[str, float]:
    """Medians of the undisturbed streams; the ratio to ``reference`` over the runs where both were."""
    used = [r for r in streams if r.clean] or streams
    out = {
        "decode_tps": statistics.median(r.decode_tps for r in used),
        "e2e_tps": statistics.median(r.e2e_tps for r in used),
        "ttft_s": statistics.median(r.ttft_s for r in used),
        "tokens": statistics.median(r.tokens for r in used),
        "runs_used": len(used),
    }
    if reference is not None:
        pairs = list(zip(streams, reference, strict=True))
        pairs = [(a, b) for a, b in pairs if a.clean and b.clean] or pairs
        ratios = [a.decode_tps / b.decode_tps for a, b in pairs]
        out |= {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    model = result.get("served_ref") or Path(s["model"]).name
    lines = [
        f"{model}, greedy, max_tokens={s['max_tokens']}, threads={s['threads']}, "
        f"n_ctx={s['n_ctx']} per sequence, parallel={s['parallel']}, repacking off, "
        f"flash attention {'on' if s['flash_attn'] else 'off'}, streams read by the "
        f"{s.get('client', 'openai')} client",
        "load average (1, 5, 15 min) before and after: "
        + "; ".join(", ".join(f"{x:.1f}" for x in la) for la in result["loadavg_before_after"])
        + f" on {os.cpu_count()} CPUs; waited {result['waited_for_idle_cpus_s']:.0f} s for idle CPUs;"
        f" {len(result['measured_again'])} measurements taken again because other processes ran;"
        f" disturbed but kept: {', '.join(result['disturbed_kept']) or 'none'}",
        f"Lamina gguf options: {result['lamina_gguf_options']}"
        + (
            ""
            if result["lamina_parallel"]
            else "  (no `parallel` in GGUFOptions: the engine before batching)"
        ),
        "",
        f"single stream, {s['single_runs']} runs each, alternating; medians",
        f"{'':<24} {'decode t/s':>10} {'e2e t/s':>8} {'TTFT ms':>8} {'tokens':>7} {'/ in-process':>13}",
    ]
    for name, row in result["single"].items():
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else ""
        lines.append(
            f"{name:<24} {row['decode_tps']:>10.1f} {row['e2e_tps']:>8.1f} {row['ttft_s'] * 1000:>8.0f} "
            f"{row['tokens']:>7.0f} {ratio:>13}"
        )
    lines += [
        "",
        f"concurrent streams, {s['rounds']} rounds; aggregate generation t/s (median of the undisturbed "
        "rounds), TTFT p50/p95 ms over their streams, mean tokens per stream",
    ]
    head = f"{'streams':>7}"
    for name in result["concurrent"]:
        head += f" | {name + ' t/s':>16} {'p50':>6} {'p95':>6} {'tok':>5}"
    lines.append(head + f" | {'batched-bench S_TG t/s':>22} {'T_PP ms':>8}")
    bb = {int(row["b"]): row for row in result["batched_bench"]}
    for i, n in enumerate(LEVELS):
        line = f"{n:>7}"
        for levels in result["concurrent"].values():
            r = levels[i]
            line += (
                f" | {r['aggregate_tps']:>16.1f} {r['ttft_p50_s'] * 1000:>6.0f} "
                f"{r['ttft_p95_s'] * 1000:>6.0f} {r['mean_tokens']:>5.1f}"
            )
        row = bb.get(n)
        line += f" | {row['s_tg_tps']:>22.1f} {row['t_pp_s'] * 1000:>8.0f}" if row else " |"
        lines.append(line)
    lines.append("")
    for name, levels in result["concurrent"].items():
        one, eight = levels[0]["aggregate_tps"], levels[LEVELS.index(8)]["aggregate_tps"]
        lines.append(f"{name}: 8 streams / 1 stream = {eight / one:.2f}x")
    if 1 in bb and 8 in bb:
        lines.append(f"llama-batched-bench: 8 / 1 = {bb[8]['s_tg_tps'] / bb[1]['s_tg_tps']:.2f}x")
    if {"lamina", "llama-server"} <= set(result["concurrent"]):
        lam, srv = result["concurrent"]["lamina"], result["concurrent"]["llama-server"]
        i8 = LEVELS.index(8)
        lines.append(
            f"lamina / llama-server at 8 streams = {lam[i8]['aggregate_tps'] / srv[i8]['aggregate_tps']:.2f}"
            f"; lamina TTFT p50 at 8 streams = {lam[i8]['ttft_p50_s']:.2f} s"
            " (targets: >= 1.6x, >= 1.0, < 1 s)"
        )
    pairs = result.get("paired") or {}
    for name, got in pairs.items():
        if name != "lamina_vs_server_at_8":
            lines.append(
                f"{name}: 8 / 1 over {got['n']} back-to-back pairs = {got['median']:.2f}x (median; "
                f"{got['min']:.2f} to {got['max']:.2f})"
            )
    if "lamina_vs_server_at_8" in pairs:
        v = pairs["lamina_vs_server_at_8"]
        lines.append(
            f"lamina / llama-server at 8 streams over the pairs = {v['median']:.2f} (median; "
            f"{v['min']:.2f} to {v['max']:.2f})"
        )
    return "\n".join(lines)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="waves per concurrency level and system")
    ap.add_argument("--single-runs", type=int, default=5, help="single streams per system")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads everywhere")
    ap.add_argument("--n-ctx", type=int, default=4096, help="context of each sequence (slot)")
    ap.add_argument(
        "--flash-attn",
        action="store_true",
        help="flash attention on everywhere (Lamina: only where GGUFOptions has flash_attn)",
    )
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--parallel", type=int, default=8, help="slots of llama-server and of Lamina's engine")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="llama-batched-bench's prompt length")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument(
        "--model",
        help="a GGUF file served by every system (default: the file of what `lamina up` serves by default, "
        "the bundled SmolLM2's Q8_0 variant), e.g. one that `lamina models quantize` wrote",
    )
    ap.add_argument(
        "--shipped",
        action="store_true",
        help="every system on the bundled SmolLM2 file as shipped (Q4_1; the runs before 2 December 17:00)",
    )
    ap.add_argument(
        "--pairs", type=int, default=6, help="back-to-back waves of 1 and 8 streams per system (0: none)"
    )
    ap.add_argument("--llama-bin", help=f"folder of the llama.cpp tools (else ${TOOLS_ENV}, else build/)")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="seconds to wait, before each measurement, for other processes to leave the CPUs idle",
    )
    ap.add_argument("--skip-server", action="store_true", help="leave out llama-server and batched-bench")
    ap.add_argument(
        "--client",
        choices=("sse", "openai"),
        default="sse",
        help="how streams are read: httpx and json.loads per event (less CPU taken from the servers), or "
        "the openai client (the runs before 2 December)",
    )
    return ap.parse_args()


def main() -> None:
    args = arguments()

    s = Settings(
        args.threads,
        args.n_ctx,
        args.n_batch,
        args.parallel,
        args.max_tokens,
        args.seed,
        args.flash_attn,
        str(smollm2_path()) if args.shipped else str(Path(args.model).resolve()) if args.model else "",
    )
    tools = None if args.skip_server else find_tools(args.llama_bin)
    config, gguf = lamina_config(s)
    load_before = os.getloadavg()
    kept = tempfile.TemporaryDirectory(prefix="lamina-bench-model-")  # removed at exit

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        log("starting lamina up, llama-server, and llama-cpp-python in-process")
        (Path(tmp) / "lamina").mkdir()
        urls = {"lamina": servers.enter_context(lamina_stack(Path(tmp) / "lamina", s))}
        served_ref = None
        if not s.model:  # the others get the file of what the stack serves by default (a copy that
            # outlives the stack's state folder: llama-batched-bench runs after the servers stopped)
            served_ref, path = served_file(Path(tmp) / "lamina" / "state")
            s = replace(s, model=shutil.copy(path, kept.name))
            log(f"lamina serves {served_ref}: every system runs its file")
        if tools:
            urls["llama-server"] = servers.enter_context(llama_server(tools[0], Path(tmp), s))
        if args.client == "openai":
            clients = {
                n: openai.OpenAI(base_url=u, api_key="bench", max_retries=0, timeout=600)
                for n, u in urls.items()
            }
            http = {n: over_http(c, s) for n, c in clients.items()}
        else:
            sse = servers.enter_context(httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64)))
            http = {n: over_http_sse(sse, u, s) for n, u in urls.items()}
        runs = {"in-process": in_process(s), **http}
        for name, run in runs.items():  # warm-up: weights paged in, caches built
            log(f"warm-up {name}: {run(prompt('w', -1)).tokens} tokens")
        machine = Machine(args.quiet_wait)
        log("single streams")
        single = single_streams(runs, args.single_runs, machine)
        log("concurrent streams")
        levels = concurrency(http, args.rounds, machine)
        pairs = paired(http, args.pairs, machine) if args.pairs else {}

    bb_rows: list[dict[str, float]] = []
    bb_table = ""
    if tools:
        log("llama-batched-bench")
        (bb_rows, bb_table), _clean = machine.measure(
            "llama-batched-bench", partial(batched_bench, tools[1], s, args.prompt_tokens)
        )
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "loadavg_before_after": [load_before, os.getloadavg()],
        "waited_for_idle_cpus_s": machine.waited_s,
        "measured_again": machine.redone,
        "disturbed_kept": machine.disturbed,
        "settings": asdict(s)
        | {"rounds": args.rounds, "single_runs": args.single_runs, "pairs": args.pairs}
        | {"client": args.client},
        "lamina_gguf_options": gguf,
        "lamina_parallel": "parallel" in gguf,
        "lamina_config": json.loads(config),
        "served_ref": served_ref,
        "llama_server_argv": llama_server_argv(tools[0], 0, s)[1:] if tools else None,
        "single": {
            name: _single_summary(streams, None if name == "in-process" else single["in-process"])
            for name, streams in single.items()
        },
        "concurrent": {name: [lv.summary() for lv in by.values()] for name, by in levels.items()},
        "concurrent_waves": {name: {n: asdict(lv) for n, lv in by.items()} for name, by in levels.items()},
        "pairs": pairs,
        "paired": paired_summary(pairs) if pairs else {},
        "single_streams": {name: [asdict(r) for r in streams] for name, streams in single.items()},
        "batched_bench": bb_rows,
        "batched_bench_table": bb_table,
    }
    text = report(result)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"serve_concurrency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwritten: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
