"""The one small interface every engine implements, the types that cross it, and how plugins describe
themselves.

An engine runs one model in one process. It is synchronous and single-threaded from its caller's point of
view: the replica worker queues requests and calls it from one thread at a time. Engines are plugins: each
``lamina.engines`` entry point names an :class:`EngineDescriptor` (``gguf``, ``onnx``, ``fake`` are built
in, see ``_builtin_engines``), which says what the engine can do, which options it takes, what a replica
of it needs and how to make it. The core asks the descriptor and never spells an engine's name, so an
engine installed as a package serves with no change here, and a test engine is registered exactly like a
real one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from lamina.errors import ConfigError
from lamina.orchestration import Resources

FinishReason = Literal["stop", "length"]


class Capability(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    STREAMING = "streaming"
    #: per-token log probabilities (``logprobs``, ``top_logprobs``)
    LOGPROBS = "logprobs"
    #: decoding constrained by a GBNF grammar (``response_format`` json, forced tool calls)
    GRAMMAR = "grammar"
    #: ``presence_penalty``, ``frequency_penalty`` and ``logit_bias``
    PENALTIES = "penalties"
    #: continuous batching: requests are submitted to the engine and advanced together by ``step()``
    #: (see :class:`BatchingEngine`)
    BATCHING = "batching"
    #: answers OpenAI request bodies itself, many at once, on the worker's event loop instead of the engine
    #: thread (see :class:`PassthroughEngine`): a remote upstream
    PASSTHROUGH = "passthrough"


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: (token id, bias added to its logit); -100 bans a token, +100 forces it
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: None: no log probabilities; k >= 0: each token's and its k most likely alternatives'
    logprobs: int | None = None
    #: a GBNF grammar (root rule ``root``) that the output must match
    grammar: str | None = None

    def needs(self) -> frozenset[Capability]:
        """The capabilities beyond plain sampling that honouring these parameters takes."""
        needed = set()
        if self.logprobs is not None:
            needed.add(Capability.LOGPROBS)
        if self.grammar is not None:
            needed.add(Capability.GRAMMAR)
        if self.presence_penalty or self.frequency_penalty or self.logit_bias:
            needed.add(Capability.PENALTIES)
        return frozenset(needed)


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    #: the token's UTF-8 bytes (a token can hold part of a character)
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability and, when asked, its most likely alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


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
    #: the tokens this delta's text came from, when log probabilities were asked for
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class EmbeddingBatch:
    vectors: list[list[float]]
    prompt_tokens: int


class Sink(Protocol):
    """Where a batching engine delivers one request's deltas, on the engine thread."""

    @property
    def cancelled(self) -> bool:
        """True once nobody wants the answer any more (the client left, the replica is stopping)."""
        ...

    def put(self, delta: Delta) -> None: ...

    def flush(self) -> None:
        """What was put so far may go to the client now: an engine calls it between the parts of a long
        step (decoding streams' tokens before a long prompt's prefill); without it they go at the step's
        end."""
        ...

    def fail(self, exc: BaseException) -> None: ...

    def close(self) -> None:
        """Called exactly once, last, whether the request finished, failed or was dropped."""
        ...


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


@dataclass(frozen=True)
class EngineDescriptor:
    """An engine plugin as it describes itself: what its ``lamina.engines`` entry point names.

    Importing the module that holds a descriptor must be cheap (listing engines imports every one): the
    factory imports the engine's heavy libraries when it is called, in the replica worker.
    """

    name: str
    description: str
    capabilities: frozenset[Capability]
    #: its options: a pydantic model (``extra="forbid"``, a description per field); a deployment's
    #: options block for this engine is validated by it when the config is loaded
    options: type[BaseModel]
    #: makes the engine for one model (in the replica worker)
    factory: EngineFactory
    #: what one replica asks for, given its model's files (none when it takes none) and parsed options
    resources: Callable[[Sequence[Path], Any], Resources]
    #: the registry formats of the model files it loads (``gguf``, ``onnx``); empty: it takes none
    formats: frozenset[str] = frozenset()
    #: how many requests one replica runs at once, given its parsed options (what "busy" means for it)
    slots: Callable[[Any], int] = lambda _options: 1

    @property
    def needs_model(self) -> bool:
        return bool(self.formats)

    def parse_options(self, options: Mapping[str, Any], where: str) -> BaseModel:
        """``options`` validated by the engine's model; a ConfigError names ``where`` and each field."""
        try:
            return self.options.model_validate(dict(options))
        except ValidationError as exc:
            problems = "; ".join(
                f"`{'.'.join(str(p) for p in e['loc']) or '(top level)'}`: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(
                f"{where}: {self.name} options: {problems} (`lamina engines` lists the options)"
            ) from exc

    def validate_options(self, options: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The options with their defaults filled in, as plain JSON-able values."""
        return self.parse_options(options, where).model_dump(mode="json")


ENGINE_ENTRY_POINTS = "lamina.engines"


def engine_names() -> list[str]:
    """Every engine plugin installed."""
    return sorted(ep.name for ep in entry_points(group=ENGINE_ENTRY_POINTS))


def engine_descriptor(name: str) -> EngineDescriptor:
    """The installed engine ``name``, or a ConfigError listing those installed."""
    found = [ep for ep in entry_points(group=ENGINE_ENTRY_POINTS) if ep.name == name]
    if not found:
        raise ConfigError(
            f"no engine plugin named {name!r}; installed: {', '.join(engine_names()) or 'none'} "
            "(`lamina engines` describes them; a plugin registers one under the `lamina.engines` entry point)"
        )
    descriptor = found[0].load()
    if not isinstance(descriptor, EngineDescriptor):
        raise ConfigError(
            f"the engine plugin {name!r} ({found[0].value}) is not an EngineDescriptor; point its "
            "`lamina.engines` entry point at one"
        )
    return descriptor


def engine_descriptors() -> list[EngineDescriptor]:
    """Every installed engine, by name."""
    return [engine_descriptor(name) for name in engine_names()]


def engine_for_format(fmt: str) -> EngineDescriptor:
    """The engine that loads model files of format ``fmt``: the one named like the format if it loads it,
    else the first installed that does."""
    loaders = [d for d in engine_descriptors() if fmt in d.formats]
    if not loaders:
        raise ConfigError(f"no installed engine loads {fmt} files; install an engine plugin that does")
    return next((d for d in loaders if d.name == fmt), loaders[0])


def load_engine(engine: str, spec: LoadSpec) -> Engine:
    """Instantiate the engine plugin called ``engine`` on ``spec``."""
    return engine_descriptor(engine).factory(spec)


class BatchingEngine(Engine, Protocol):
    """An engine that decodes many requests at once (capability ``batching``).

    ``submit_*`` queue a request and return at once; each ``step()`` admits queued requests into free slots
    and advances every running one by a token (prompts by a chunk), delivering deltas to their sinks. The
    caller steps while ``step()`` returns True, running other engine calls between steps.
    """

    def submit_chat(self, messages: Sequence[ChatMessage], params: SamplingParams, sink: Sink) -> None: ...

    def submit_completion(self, prompt: str, params: SamplingParams, sink: Sink) -> None: ...

    def step(self) -> bool: ...


#: the OpenAI operations a replica serves
Operation = Literal["chat", "completion", "embedding"]


class Started(Protocol):
    """Where a passthrough engine marks the moment a request stops waiting and goes to work."""

    def begin(self) -> None: ...


class PassthroughEngine(Engine, Protocol):
    """An engine that answers OpenAI request bodies itself (capability ``passthrough``), e.g. by sending
    them to a remote server. The worker awaits it on its event loop, many requests at once, and never puts
    its requests on the engine thread; it adds the ``lamina`` extension and the final usage chunk itself.

    Both methods get the client's body as sent and call ``started.begin()`` once the request has a slot.
    Errors are LaminaErrors; cancelling the awaiting task abandons the request.
    """

    async def answer(self, op: Operation, body: dict[str, Any], started: Started) -> dict[str, Any]:
        """The whole answer's JSON body."""
        ...

    def stream(self, op: Operation, body: dict[str, Any], started: Started) -> AsyncIterator[dict[str, Any]]:
        """The answer's stream chunks as they come; a chunk with ``"choices": []`` carries the usage."""
        ...

    async def aclose(self) -> None:
        """Let go of connections; called on the event loop as the worker stops."""
        ...
