"""The engines that ship with Lamina, as they describe themselves: llama.cpp (GGUF), ONNX Runtime, fake,
a remote OpenAI-compatible API.

Each ``lamina.engines`` entry point in pyproject.toml names one of the descriptors below. This module is
imported to list or check engines, so it holds only their options and what a replica needs; each factory
imports its engine (llama.cpp, ONNX Runtime) when a replica calls it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lamina.compute import default_threads
from lamina.models._engine import Capability, Engine, EngineDescriptor, LoadSpec
from lamina.models._gguf_header import read_gguf_header
from lamina.models._remote_options import OPENAI_CAPABILITIES, OpenAIOptions, remote_resources
from lamina.orchestration import Resources

_MIB = 1 << 20
#: what a worker process needs before its model: Python, the HTTP server, the engine library
_BASE_MEMORY_MB = 256
_GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GGUFOptions(_Strict):
    n_ctx: int = Field(
        4096, ge=64, description="Context window of each request in tokens (capped at the model's own)."
    )
    parallel: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Requests decoded together (continuous batching), each with its own n_ctx of KV "
        "cache. Empty: chosen from n_ctx (16384 // n_ctx, between 1 and 8: 4 at 4096).",
    )
    n_threads: int | None = Field(
        None, ge=1, description="llama.cpp threads for generation. Empty: the physical cores of the machine."
    )
    n_threads_batch: int | None = Field(
        None, ge=1, description="llama.cpp threads for prompt processing. Empty: same as n_threads."
    )
    n_batch: int = Field(512, ge=1, description="Prompt-processing batch size in tokens.")
    n_gpu_layers: int = Field(
        0, ge=-1, description="Layers to offload to the GPU (-1: all). Needs a CUDA build of llama.cpp."
    )
    use_extra_bufts: bool = Field(
        False,
        description="llama.cpp weight repacking into CPU-specific layouts (extra buffer types). Faster "
        "prompt processing on CPUs whose repacked kernels work; off by default because on some CPUs "
        "repacked Q4 weights crash in decode. Turn it on after `make bench` runs cleanly with it.",
    )
    flash_attn: bool = Field(
        False,
        description="llama.cpp's flash attention. Off by default: its CPU kernel computes a token "
        "differently depending on how many others share its batch, so greedy answers would depend on "
        "the traffic around them; with it off they never do. Turn it on for speed on a GPU.",
    )
    pin_threads: bool | None = Field(
        None,
        description="Pin llama.cpp's threads, one to each physical core (its engine thread to the first). "
        "Empty: pinned when the threads are as many as the physical cores the replica may use (the "
        "default), so that two of them never share a core while the gateway or a batch job runs beside "
        "them; false: the kernel places them.",
    )
    seed: int = Field(-1, description="Sampling seed; -1 draws a random one per request.")


class ONNXOptions(_Strict):
    providers: list[str] | None = Field(
        None,
        description="ONNX Runtime execution providers in order of preference. Empty: TensorRT, CUDA, "
        "then CPU, keeping those this onnxruntime build has.",
    )
    batch_size: int = Field(32, ge=1, description="Texts per forward pass when embedding.")
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens per forward pass, padding included (a longer text runs alone). Empty: 512 on "
        "the CPU, where larger passes run slower per token, and 16384 on a GPU provider.",
    )
    max_length: int = Field(256, ge=8, description="Tokens per text; longer texts are truncated.")
    intra_op_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime threads. Empty: one per physical core this process may use."
    )


class FakeOptions(_Strict):
    mode: Literal["echo", "replay"] = Field(
        "echo", description="echo: answers with the last user message; replay: answers with `tokens`."
    )
    tokens: list[str] = Field(
        default_factory=lambda: ["Hello", " from", " the", " fake", " engine", "."],
        description="Tokens to replay in `replay` mode.",
    )
    seconds_per_token: float = Field(0.0, ge=0, description="Time the fake engine spends on each token.")
    n_ctx: int = Field(2048, ge=16, description="Context window the fake engine claims.")
    embedding_dim: int = Field(16, ge=1, description="Length of the fake engine's embedding vectors.")


#: the KV cache tokens that an unset ``parallel`` spreads over its slots
_DEFAULT_KV_TOKENS = 16384


def parallel_slots(options: GGUFOptions) -> int:
    """The configured ``parallel``, else as many slots of ``n_ctx`` as fit in 16k tokens of cache (1-8)."""
    if options.parallel is not None:
        return options.parallel
    return max(1, min(8, _DEFAULT_KV_TOKENS // options.n_ctx))


def physical_cores() -> int:
    """The physical cores this process may run on (the compute layer's count, under the affinity mask):
    llama.cpp gains nothing from hyperthreads."""
    return default_threads()


def _memory_mb(files: Sequence[Path]) -> int:
    """About 1.5x the model's files (an ONNX model's external data included), at least the base."""
    size = sum(f.stat().st_size for f in files if f.is_file())
    return max(_BASE_MEMORY_MB, math.ceil(size / _MIB * 1.5))


def _gguf_resources(files: Sequence[Path], options: Any) -> Resources:
    """Its threads, about 1.5x its files plus the KV cache of its parallel slots, and a GPU when layers are
    offloaded."""
    assert isinstance(options, GGUFOptions)
    kv = sum(kv_cache_bytes(f, options) for f in files[:1] if f.is_file())
    return Resources(
        cpus=float(options.n_threads or physical_cores()),
        memory_mb=_memory_mb(files) + math.ceil(kv / _MIB),
        gpus=1 if options.n_gpu_layers != 0 else 0,
    )


def kv_cache_bytes(path: Path, options: GGUFOptions) -> int:
    """The f16 KV cache of ``parallel`` slots of ``n_ctx`` tokens, from the model's header; 0 when the header
    does not say enough (the estimate is then the files alone)."""
    with path.open("rb") as f:
        values = read_gguf_header(f, os.fstat(f.fileno()).st_size, str(path)).values
    arch = values.get("general.architecture")

    def number(key: str, default: int = 0) -> int:
        value = values.get(f"{arch}.{key}", default)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    layers, heads = number("block_count"), number("attention.head_count")
    if not layers or not heads:
        return 0
    key = number("attention.key_length", number("embedding_length") // heads)
    value = number("attention.value_length", key)
    per_token = layers * number("attention.head_count_kv", heads) * (key + value) * 2
    trained = number("context_length")
    n_ctx = min(options.n_ctx, trained) if trained else options.n_ctx
    return per_token * n_ctx * parallel_slots(options)


def _onnx_resources(files: Sequence[Path], options: Any) -> Resources:
    """One core, about 1.5x its files, and a GPU when a GPU provider is asked for."""
    assert isinstance(options, ONNXOptions)
    return Resources(
        cpus=1.0,
        memory_mb=_memory_mb(files),
        gpus=1 if set(options.providers or ()) & _GPU_PROVIDERS else 0,
    )


def _gguf(spec: LoadSpec) -> Engine:
    from lamina.models._gguf import GGUFEngine

    return GGUFEngine(spec)


def _onnx(spec: LoadSpec) -> Engine:
    from lamina.models._onnx import ONNXEngine

    return ONNXEngine(spec)


def _fake(spec: LoadSpec) -> Engine:
    from lamina.models._fake import FakeEngine

    return FakeEngine(spec)


def _openai(spec: LoadSpec) -> Engine:
    from lamina.models._remote import OpenAIEngine

    return OpenAIEngine(spec)


GGUF = EngineDescriptor(
    name="gguf",
    description="llama.cpp (llama-cpp-python) running GGUF models: chat, completion, streaming, continuous "
    "batching, grammars",
    capabilities=frozenset(
        {
            Capability.CHAT,
            Capability.COMPLETION,
            Capability.STREAMING,
            Capability.BATCHING,
            Capability.LOGPROBS,
            Capability.GRAMMAR,
            Capability.PENALTIES,
        }
    ),
    options=GGUFOptions,
    factory=_gguf,
    resources=_gguf_resources,
    formats=frozenset({"gguf"}),
    slots=parallel_slots,
)
ONNX = EngineDescriptor(
    name="onnx",
    description="ONNX Runtime running sentence-embedding models (TensorRT, CUDA or CPU providers)",
    capabilities=frozenset({Capability.EMBEDDING}),
    options=ONNXOptions,
    factory=_onnx,
    resources=_onnx_resources,
    formats=frozenset({"onnx"}),
)
FAKE = EngineDescriptor(
    name="fake",
    description="echoes or replays tokens without a model file, for tests and benchmarks",
    capabilities=frozenset(
        {Capability.CHAT, Capability.COMPLETION, Capability.EMBEDDING, Capability.STREAMING}
    ),
    options=FakeOptions,
    factory=_fake,
    resources=lambda _files, _options: Resources(cpus=0.1, memory_mb=128, gpus=0),
)
OPENAI = EngineDescriptor(
    name="openai",
    description="a remote OpenAI-compatible API (OpenAI, vLLM, llama-server, Ollama): requests are forwarded "
    "as sent, many at once, with no model file here",
    capabilities=OPENAI_CAPABILITIES,
    options=OpenAIOptions,
    factory=_openai,
    resources=remote_resources,
    slots=lambda options: int(options.max_concurrency),
)
