"""The fake engine: a real engine plugin that echoes or replays tokens, for tests and gateway benchmarks.

It implements the whole :class:`~lamina.models._engine.Engine` interface without a model file, so every
layer above it (worker, dispatcher, gateway) runs for real while the "compute" is a sleep of
``seconds_per_token`` per token. Its token counts are words: ``count_tokens`` is the number of
whitespace-separated words, which makes context-length arithmetic easy to follow in tests.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator, Sequence

import numpy as np

from lamina.errors import ConfigError
from lamina.models._builtin_engines import FakeOptions
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
from lamina.models._stops import StopScanner

#: a word and the whitespace before it, so the tokens concatenate back to the text
_WORDISH = re.compile(r"\s*\S+")


def split_words(text: str) -> list[str]:
    """Word-ish tokens that join back into ``text`` (trailing whitespace aside)."""
    return _WORDISH.findall(text)


class FakeEngine:
    """Echoes the last user message (or the prompt), or replays ``options.tokens``."""

    def __init__(self, spec: LoadSpec) -> None:
        try:
            self._options = FakeOptions.model_validate(spec.options)
        except ValueError as exc:
            raise ConfigError(f"fake engine options of {spec.name!r} are invalid: {exc}") from exc
        self._name = spec.name

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="fake",
            capabilities=frozenset(
                {Capability.CHAT, Capability.COMPLETION, Capability.EMBEDDING, Capability.STREAMING}
            ),
            context_length=self._options.n_ctx,
            embedding_dim=self._options.embedding_dim,
            device="cpu",
            details={
                "mode": self._options.mode,
                "seconds_per_token": str(self._options.seconds_per_token),
            },
        )

    def count_tokens(self, text: str) -> int:
        """The number of whitespace-separated words of ``text``."""
        return len(text.split())

    def count_chat_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """The words of every message's content (roles and framing cost nothing here)."""
        return sum(self.count_tokens(m.content) for m in messages)

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Iterator[Delta]:
        last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
        return self._generate(last_user, self.count_chat_tokens(messages), params)

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        return self._generate(prompt, self.count_tokens(prompt), params)

    def embed(self, texts: Sequence[str]) -> EmbeddingBatch:
        """Unit vectors seeded by a hash of each text: equal texts, equal vectors, in any process."""
        vectors = [self._vector(t) for t in texts]
        return EmbeddingBatch(vectors=vectors, prompt_tokens=sum(self.count_tokens(t) for t in texts))

    def close(self) -> None:
        """Nothing to release."""

    def _vector(self, text: str) -> list[float]:
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self._options.embedding_dim)
        return [float(x) for x in v / np.linalg.norm(v)]

    def _generate(self, source: str, prompt_tokens: int, params: SamplingParams) -> Iterator[Delta]:
        tokens = split_words(source) if self._options.mode == "echo" else list(self._options.tokens)
        limit = params.max_tokens if params.max_tokens is not None else len(tokens)
        scanner = StopScanner(params.stop)
        produced = 0
        for token in tokens[:limit]:
            if self._options.seconds_per_token:
                time.sleep(self._options.seconds_per_token)
            produced += 1
            text, stopped = scanner.feed(token)
            if stopped:
                yield Delta(text, "stop", Usage(prompt_tokens, produced))
                return
            if text:
                yield Delta(text)
        finish: FinishReason = "length" if limit < len(tokens) else "stop"
        yield Delta(scanner.flush(), finish, Usage(prompt_tokens, produced))
