"""The GGUF engine: llama.cpp (through llama-cpp-python's low-level API) running one GGUF model on the CPU
(or a CUDA build's GPU), decoding many requests at once (see ``_gguf_batch``).

Chat prompts are rendered with the model's own chat template from the GGUF metadata, the same way
llama-cpp-python's ``Jinja2ChatFormatter`` handler does, and the rendered tokens are what runs. That makes
``count_chat_tokens`` exact by construction, which the worker needs for its context-length check. Only the
template's own text is tokenized with special tokens: a message that contains ``<|im_start|>`` stays text.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import llama_cpp.llama
from llama_cpp._internals import LlamaModel
from llama_cpp._utils import suppress_stdout_stderr
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from lamina.compute import core_cpus
from lamina.errors import ConfigError, EngineError, UnsupportedCapabilityError
from lamina.models._builtin_engines import GGUF, GGUFOptions, parallel_slots, physical_cores
from lamina.models._engine import (
    Capability,
    ChatMessage,
    Delta,
    EmbeddingBatch,
    EngineInfo,
    LoadSpec,
    SamplingParams,
    Sink,
)
from lamina.models._gguf_batch import BatchDecoder
from lamina.models._gguf_sampling import Vocab, seed_for
from lamina.models._gguf_threads import ThreadPools

log = logging.getLogger("lamina.models.gguf")

#: ``llama_cpp.llama`` reads its default model params through a module attribute; patching it is
#: process-wide, so constructions that patch it take turns.
_MODEL_PARAMS_LOCK = threading.Lock()


@contextmanager
def model_params_with_extra_bufts(enabled: bool) -> Iterator[None]:
    """Make ``Llama()`` build its model with ``use_extra_bufts = enabled``, for the ``with`` block only.

    ``Llama()`` has no argument for llama.cpp's weight repacking (extra buffer types), and on some CPUs
    repacked Q4 weights crash in decode. Its constructor starts from
    ``llama_cpp.llama.llama_cpp.llama_model_default_params()``; this swaps that one function for a
    wrapper that sets the flag, under a lock, and puts the original back afterwards.
    """
    module, name = llama_cpp.llama.llama_cpp, "llama_model_default_params"  # type: ignore[attr-defined]
    with _MODEL_PARAMS_LOCK:
        original = getattr(module, name)

        def params() -> Any:
            p = original()
            p.use_extra_bufts = enabled
            return p

        setattr(module, name, params)
        try:
            yield
        finally:
            setattr(module, name, original)


def pinned_cpus(pin: bool | None, threads: int) -> list[int] | None:
    """The CPUs to pin ``threads`` llama.cpp threads to, one per physical core this process may use
    (``GGUFOptions.pin_threads``): with None, only when the threads are as many as those cores (the
    replica then has them to itself); never more threads than cores (None: not pinned)."""
    if pin is False or threads < 2 or not hasattr(os, "sched_getaffinity"):
        return None  # llama.cpp runs a single thread unpinned whatever the mask
    cores = core_cpus(os.sched_getaffinity(0))
    if threads > len(cores):
        if pin:
            log.warning(
                "gguf.pin_threads: %d threads but %d cores to pin them to; not pinned", threads, len(cores)
            )
        return None
    return cores[:threads] if pin or threads == len(cores) else None


def context_window(requested: int, metadata: dict[str, str]) -> int:
    """``requested`` capped at the context the model was trained for (``{arch}.context_length``)."""
    arch = metadata.get("general.architecture", "llama")
    try:
        trained = int(metadata.get(f"{arch}.context_length", "0"))
    except ValueError:
        trained = 0
    return min(requested, trained) if trained > 0 else requested


def _quantization(metadata: dict[str, str]) -> str:
    try:
        return gguf.LlamaFileType(int(metadata["general.file_type"])).name.removeprefix("MOSTLY_")
    except (KeyError, ValueError):
        return "unknown"


#: marks a message's content in the rendered template, so that it alone is tokenized as plain text
_CONTENT = "\x00lamina-content-{}\x00"


class _Collect:
    """A sink for in-process callers of :meth:`GGUFEngine.chat` and :meth:`GGUFEngine.complete`."""

    def __init__(self) -> None:
        self.deltas: deque[Delta] = deque()
        self.error: BaseException | None = None
        self.closed = False
        self.cancelled = False

    def put(self, delta: Delta) -> None:
        self.deltas.append(delta)

    def flush(self) -> None:
        pass  # the caller reads the deltas after each step

    def fail(self, exc: BaseException) -> None:
        self.error = exc

    def close(self) -> None:
        self.closed = True


class GGUFEngine:
    """One GGUF model in llama.cpp: chat, completion and streaming, with continuous batching."""

    def __init__(self, spec: LoadSpec) -> None:
        try:
            self._options = GGUFOptions.model_validate(spec.options)
        except ValueError as exc:
            raise ConfigError(f"gguf engine options of {spec.name!r} are invalid: {exc}") from exc
        if spec.path is None or not spec.path.is_file():
            raise ConfigError(
                f"model {spec.name!r}: GGUF file {spec.path} not found; register the model again or fix "
                "its path"
            )
        self._name = spec.name
        self._model = self._load(spec.path)
        metadata = dict(self._model.metadata())
        self._n_ctx = context_window(self._options.n_ctx, metadata)
        self._threads = self._options.n_threads or physical_cores()
        self._parallel = parallel_slots(self._options)
        self._quantization = _quantization(metadata)
        self._ctx = self._context()
        threads_batch = self._options.n_threads_batch or self._threads
        cpus = pinned_cpus(self._options.pin_threads, max(self._threads, threads_batch))
        self._pools = ThreadPools(self._ctx, self._threads, threads_batch, cpus)
        self._vocab = Vocab(self._model.vocab)
        self._decoder = BatchDecoder(
            self._ctx, self._vocab, self._parallel, self._options.n_batch, self._n_ctx
        )
        self._formatter = self._chat_formatter(metadata)
        bos = self._model.token_bos()
        with self._callers_mask():
            self._decoder.warm_up(bos if bos != -1 else 0)
        self._chat_cache: tuple[tuple[ChatMessage, ...], list[int], tuple[str, ...]] | None = None

    def _load(self, path: Path) -> LlamaModel:
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = self._options.use_extra_bufts
        params.n_gpu_layers = self._options.n_gpu_layers
        try:
            return LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as exc:
            raise EngineError(
                f"llama.cpp could not load {path} ({exc}); check that it is a complete GGUF model file "
                "(re-register it if its checksum changed), free memory and the gguf options (n_gpu_layers)"
            ) from exc

    def _context(self) -> Any:
        """One context, one KV stream of ``n_ctx`` tokens per parallel slot, so that a sequence's numbers do
        not depend on its neighbours; flash attention only when asked (see ``GGUFOptions.flash_attn``)."""
        o, p = self._options, llama_cpp.llama_context_default_params()
        p.n_ctx = self._n_ctx * self._parallel
        p.n_seq_max = self._parallel
        p.kv_unified = False
        p.n_batch = p.n_ubatch = o.n_batch
        p.n_threads = self._threads
        p.n_threads_batch = o.n_threads_batch or self._threads
        p.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if o.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        p.no_perf = True
        with suppress_stdout_stderr(disable=False):
            ctx = llama_cpp.llama_init_from_model(self._model.model, p)
        if not ctx:
            self._model.close()  # type: ignore[no-untyped-call]
            raise EngineError(
                f"llama.cpp could not create a context of {self._parallel} x {self._n_ctx} tokens for "
                f"{self._name!r}; lower gguf.n_ctx or gguf.parallel, or free memory"
            )
        return ctx

    def _chat_formatter(self, metadata: dict[str, str]) -> Jinja2ChatFormatter | None:
        """The model's own chat template with its BOS/EOS texts, as llama-cpp-python would build it."""
        template = metadata.get("tokenizer.chat_template")
        if not template:
            return None
        model = self._model
        eos, bos = model.token_eos(), model.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )

    def info(self) -> EngineInfo:
        caps = set(GGUF.capabilities)
        if self._formatter is None:
            caps.discard(Capability.CHAT)
        on_gpu = self._options.n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
        return EngineInfo(
            engine="gguf",
            capabilities=frozenset(caps),
            context_length=self._n_ctx,
            device="cuda" if on_gpu else "cpu",
            details={
                "threads": str(self._threads),
                "threads_batch": str(self._options.n_threads_batch or self._threads),
                "n_ctx": str(self._n_ctx),
                "parallel": str(self._parallel),
                "flash_attn": str(self._options.flash_attn).lower(),
                "thread_pool": str(self._pools.attached).lower(),
                "pinned_cpus": ",".join(map(str, self._pools.pinned)) or "none",
                "use_extra_bufts": str(self._options.use_extra_bufts).lower(),
                "quantization": self._quantization,
                "n_gpu_layers": str(self._options.n_gpu_layers),
            },
        )

    def prefix_cache(self) -> dict[str, int]:
        """Prompt tokens served from the prefix cache and evaluated, since the engine started."""
        return {"reused": self._decoder.reused_tokens, "evaluated": self._decoder.evaluated_tokens}

    def count_tokens(self, text: str) -> int:
        """The tokens of ``text`` as a completion prompt (with BOS when the model adds one)."""
        return len(self._prompt_tokens(text))

    def count_chat_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """The tokens of the prompt the chat template renders for ``messages``, exactly as run."""
        return len(self._chat_prompt(messages)[0])

    def submit_chat(self, messages: Sequence[ChatMessage], params: SamplingParams, sink: Sink) -> None:
        tokens, stops = self._chat_prompt(messages)
        self._submit(tokens, replace(params, stop=(*params.stop, *stops)), sink)

    def submit_completion(self, prompt: str, params: SamplingParams, sink: Sink) -> None:
        self._submit(self._prompt_tokens(prompt), params, sink)

    def step(self) -> bool:
        return self._decoder.step()

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Iterator[Delta]:
        sink = _Collect()
        self.submit_chat(messages, params, sink)
        return self._drive(sink)

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        sink = _Collect()
        self.submit_completion(prompt, params, sink)
        return self._drive(sink)

    def embed(self, texts: Sequence[str]) -> EmbeddingBatch:
        raise UnsupportedCapabilityError(
            f"model {self._name!r} is a generative GGUF model: it can do "
            f"{', '.join(sorted(self.info().capabilities))}, not embeddings; send embeddings to an "
            "embedding model"
        )

    def close(self) -> None:
        self._decoder.close()
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        self._pools.close()
        self._model.close()  # type: ignore[no-untyped-call]

    def _submit(self, tokens: list[int], params: SamplingParams, sink: Sink) -> None:
        if params.max_tokens is None:
            params = replace(params, max_tokens=max(1, self._n_ctx - len(tokens)))
        self._decoder.submit(tokens, params, sink, seed_for(params, self._options.seed))

    def _drive(self, sink: _Collect) -> Iterator[Delta]:
        """Step the decoder on the caller's thread until this request has finished."""
        with self._callers_mask():
            yield from self._steps(sink)

    @contextmanager
    def _callers_mask(self) -> Iterator[None]:
        """Pinned threads pin the thread that decodes too (to the first CPU): one that decodes in process,
        not the replica's engine thread, gets its own CPU mask back after."""
        mask = os.sched_getaffinity(0) if self._pools.pinned else None
        try:
            yield
        finally:
            if mask is not None:
                os.sched_setaffinity(0, mask)

    def _steps(self, sink: _Collect) -> Iterator[Delta]:
        try:
            while True:
                while sink.deltas:
                    yield sink.deltas.popleft()
                if sink.error is not None:
                    raise sink.error
                if sink.closed:
                    return
                self.step()
        finally:
            if not sink.closed:
                sink.cancelled = True
                while not sink.closed:
                    self.step()

    def _tokenize(self, text: str, *, bos: bool, special: bool) -> list[int]:
        tokens: list[int] = self._model.tokenize(text.encode("utf-8"), add_bos=bos, special=special)
        return tokens

    def _prompt_tokens(self, text: str) -> list[int]:
        tokens = self._tokenize(text, bos=True, special=True)
        bos = self._model.token_bos()
        # llama.cpp cannot start from nothing: an empty prompt is the BOS token alone
        return tokens or ([bos] if bos != -1 else tokens)

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> tuple[list[int], tuple[str, ...]]:
        """Render and tokenize, remembering the last one: the worker counts, then generates.

        The template is rendered around placeholders; its own text is tokenized with special tokens and
        each message's content as plain text, so a user cannot inject the template's markers.
        """
        if self._formatter is None:
            raise UnsupportedCapabilityError(
                f"model {self._name!r} has no chat template in its GGUF metadata: use /v1/completions "
                "with a prompt you format yourself"
            )
        key = tuple(messages)
        if self._chat_cache is not None and self._chat_cache[0] == key:
            return self._chat_cache[1], self._chat_cache[2]
        marks = [_CONTENT.format(i) for i in range(len(messages))]
        as_dicts: Any = [{"role": m.role, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        rendered = self._formatter(messages=as_dicts)
        tokens, rest, bos = [], rendered.prompt, not rendered.added_special
        for mark, message in zip(marks, messages, strict=True):
            before, found, rest = rest.partition(mark)
            if not found:  # the template dropped or changed this message: render it as it is
                before, rest = before + message.content, rest
            tokens += self._tokenize(before, bos=bos, special=True)
            tokens += self._tokenize(message.content, bos=False, special=False) if found else []
            bos = False
        tokens += self._tokenize(rest, bos=bos, special=True)
        stops = tuple(rendered.stop or ()) if not isinstance(rendered.stop, str) else (rendered.stop,)
        self._chat_cache = (key, tokens, stops)
        return tokens, stops
