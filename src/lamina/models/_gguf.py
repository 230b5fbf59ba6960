"""The GGUF engine: llama-cpp-python running one GGUF model on the CPU (or a CUDA build's GPU).

Chat prompts are rendered with the model's own chat template from the GGUF metadata, the same way
llama-cpp-python's ``Jinja2ChatFormatter`` handler does, and the rendered tokens are what runs. That makes
``count_chat_tokens`` exact by construction, which the worker needs for its context-length check.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import llama_cpp.llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from lamina.errors import ConfigError, EngineError, UnsupportedCapabilityError
from lamina.models._builtin_engines import GGUFOptions, physical_cores
from lamina.models._engine import (
    Capability,
    ChatMessage,
    Delta,
    EmbeddingBatch,
    EngineInfo,
    FinishReason,
    LoadSpec,
    SamplingParams,
    Usage,
)

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


def read_metadata(path: Path) -> dict[str, str]:
    """The GGUF key/value metadata, read by loading the vocabulary only (fast, no weights)."""
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        model = LlamaModel(path_model=str(path), params=params, verbose=False)
    except ValueError as exc:
        raise EngineError(
            f"{path}: llama.cpp cannot read this GGUF file ({exc}); check that it is a complete GGUF model "
            "file (re-register it if its checksum changed)"
        ) from exc
    try:
        return dict(model.metadata())
    finally:
        model.close()  # type: ignore[no-untyped-call]


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


class GGUFEngine:
    """One GGUF model in llama.cpp; chat, completion and streaming."""

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
        metadata = read_metadata(spec.path)
        self._n_ctx = context_window(self._options.n_ctx, metadata)
        self._threads = self._options.n_threads or physical_cores()
        self._quantization = _quantization(metadata)
        self._llm = self._load(spec.path)
        self._formatter = self._chat_formatter(metadata)
        self._chat_cache: tuple[tuple[ChatMessage, ...], list[int], Any] | None = None

    def _load(self, path: Path) -> Any:
        o = self._options
        try:
            with model_params_with_extra_bufts(o.use_extra_bufts):
                return llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=self._n_ctx,
                    n_batch=o.n_batch,
                    n_threads=self._threads,
                    n_threads_batch=o.n_threads_batch or self._threads,
                    n_gpu_layers=o.n_gpu_layers,
                    verbose=False,
                )
        except ValueError as exc:
            raise EngineError(
                f"llama.cpp could not load {path} ({exc}); check free memory and the gguf options "
                "(n_ctx, n_gpu_layers)"
            ) from exc

    def _chat_formatter(self, metadata: dict[str, str]) -> Jinja2ChatFormatter | None:
        """The model's own chat template with its BOS/EOS texts, as llama-cpp-python would build it."""
        template = metadata.get("tokenizer.chat_template")
        if not template:
            return None
        model = self._llm._model
        eos, bos = self._llm.token_eos(), self._llm.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )

    def info(self) -> EngineInfo:
        caps = {Capability.COMPLETION, Capability.STREAMING}
        if self._formatter is not None:
            caps.add(Capability.CHAT)
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
                "use_extra_bufts": str(self._options.use_extra_bufts).lower(),
                "quantization": self._quantization,
                "n_gpu_layers": str(self._options.n_gpu_layers),
            },
        )

    def count_tokens(self, text: str) -> int:
        """The tokens of ``text`` as a completion prompt (with BOS when the model adds one)."""
        return len(self._prompt_tokens(text))

    def count_chat_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """The tokens of the prompt the chat template renders for ``messages``, exactly as run."""
        return len(self._chat_prompt(messages)[0])

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Iterator[Delta]:
        tokens, rendered = self._chat_prompt(messages)
        stops = [*params.stop, *(rendered.stop or [])]
        return self._stream(tokens, params, stops, rendered.stopping_criteria)

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        return self._stream(self._prompt_tokens(prompt), params, list(params.stop), None)

    def embed(self, texts: Sequence[str]) -> EmbeddingBatch:
        raise UnsupportedCapabilityError(
            f"model {self._name!r} is a generative GGUF model: it can do "
            f"{', '.join(sorted(self.info().capabilities))}, not embeddings; send embeddings to an "
            "embedding model"
        )

    def close(self) -> None:
        self._llm.close()

    def _prompt_tokens(self, text: str) -> list[int]:
        tokens: list[int] = self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        bos = self._llm.token_bos()
        # llama.cpp cannot start from nothing: an empty prompt is the BOS token alone
        return tokens or ([bos] if bos != -1 else tokens)

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> tuple[list[int], Any]:
        """Render and tokenize, remembering the last one: the worker counts, then generates."""
        if self._formatter is None:
            raise UnsupportedCapabilityError(
                f"model {self._name!r} has no chat template in its GGUF metadata: use /v1/completions "
                "with a prompt you format yourself"
            )
        key = tuple(messages)
        if self._chat_cache is not None and self._chat_cache[0] == key:
            return self._chat_cache[1], self._chat_cache[2]
        as_dicts: Any = [{"role": m.role, "content": m.content} for m in messages]
        rendered = self._formatter(messages=as_dicts)
        tokens: list[int] = self._llm.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )
        self._chat_cache = (key, tokens, rendered)
        return tokens, rendered

    def _seed(self, params: SamplingParams) -> int:
        if params.seed is not None:
            return params.seed
        return self._options.seed if self._options.seed >= 0 else random.randrange(2**31)

    def _stream(
        self, tokens: list[int], params: SamplingParams, stops: list[str], criteria: Any
    ) -> Iterator[Delta]:
        """Deltas from llama-cpp-python's streaming completion; each chunk before the last is one token."""
        if params.temperature == 0:
            # llama.cpp's numbers differ slightly between evaluating a prompt in one batch and replaying a
            # cached prefix token by token, enough to flip a near-tie in argmax; a greedy answer must not
            # depend on what ran before, so greedy requests evaluate their whole prompt afresh.
            self._llm.reset()
        chunks = self._llm.create_completion(
            prompt=tokens,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=stops,
            seed=self._seed(params),
            stopping_criteria=criteria,
            stream=True,
        )
        produced = 0
        finish: FinishReason = "stop"
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                if choice["finish_reason"] is not None:
                    finish = "length" if choice["finish_reason"] == "length" else "stop"
                    break
                produced += 1
                if choice["text"]:
                    yield Delta(choice["text"])
        finally:
            chunks.close()
        yield Delta("", finish, Usage(len(tokens), produced))
