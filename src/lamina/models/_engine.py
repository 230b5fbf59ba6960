"""The one small interface every engine implements, and the types that cross it.

An engine runs one model in one process. It is synchronous and single-threaded from its caller's point of
view: the replica worker queues requests and calls it from one thread at a time. Engines are plugins found
through the ``lamina.engines`` entry-point group (``gguf``, ``onnx``, ``fake`` are built in), so a test
engine is registered exactly like a real one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, Protocol

from lamina.errors import ConfigError

FinishReason = Literal["stop", "length"]


class Capability(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    STREAMING = "streaming"


@dataclass(frozen=True)
class EngineInfo:
    """What a loaded engine can do."""

    engine: str
    capabilities: frozenset[Capability]
    context_length: int
    embedding_dim: int | None = None
    #: where it runs, e.g. ``cpu`` or ``cuda:0``; for ONNX the execution provider in use
    device: str = "cpu"
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadSpec:
    """Everything an engine needs to load one model."""

    name: str
    #: the model file (None for engines that need none, like the fake engine)
    path: Path | None
    #: companion files by role, e.g. ``{"tokenizer": Path(...)}``
    extra_files: dict[str, Path] = field(default_factory=dict)
    #: the engine's own options, validated by the engine (a dict of the config's GGUFOptions etc.)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """One step of generation. The last delta of a stream has ``finish_reason`` and ``usage`` set."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class EmbeddingBatch:
    vectors: list[list[float]]
    prompt_tokens: int


class Engine(Protocol):
    """A loaded model. Methods it cannot serve raise UnsupportedCapabilityError."""

    def info(self) -> EngineInfo: ...

    def count_tokens(self, text: str) -> int: ...

    def count_chat_tokens(self, messages: Sequence[ChatMessage]) -> int: ...

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Iterator[Delta]: ...

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[Delta]: ...

    def embed(self, texts: Sequence[str]) -> EmbeddingBatch: ...

    def close(self) -> None: ...


class EngineFactory(Protocol):
    def __call__(self, spec: LoadSpec) -> Engine: ...


ENGINE_ENTRY_POINTS = "lamina.engines"


def engine_names() -> list[str]:
    """Every engine plugin installed."""
    return sorted(ep.name for ep in entry_points(group=ENGINE_ENTRY_POINTS))


def load_engine(engine: str, spec: LoadSpec) -> Engine:
    """Instantiate the engine plugin called ``engine`` on ``spec``."""
    found = [ep for ep in entry_points(group=ENGINE_ENTRY_POINTS) if ep.name == engine]
    if not found:
        raise ConfigError(
            f"no engine plugin named {engine!r}; installed: {', '.join(engine_names()) or 'none'}"
        )
    factory: EngineFactory = found[0].load()
    return factory(spec)
