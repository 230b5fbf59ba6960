"""Micro-batching on a replica: embedding requests that arrive together share one ``engine.embed`` call.

One forward pass over eight sentences costs little more than over one, so eight clients of one sentence
each should not queue for eight passes. A request opens a batch (or joins the open one); the batch closes
when the policy says so, and its texts go to the engine thread as one call. Each request then gets its own
vectors, its own usage and its own timing back.

- :func:`decide` is the policy: a pure function of a frozen :class:`OpenBatch` (the clock is read by the
  caller). A batch closes when it holds ``max_texts`` texts, or once ``window_s`` has passed since it
  opened and the engine is free of this batcher's work. While a batch is on the engine the next one keeps
  gathering, so under load batches grow by themselves and the window only costs an idle replica's lone
  request its length (a millisecond by default).
- :class:`MicroBatcher` is the gathering loop: event-driven on the asyncio loop (an arrival, a batch
  returning from the engine, or the window's timer), it asks the policy and acts.
- :func:`run_batch` is what runs on the engine thread. Usage per request: an engine reports the prompt
  tokens of a whole call, so a batch of several requests counts each request's texts with
  ``engine.count_tokens`` (a lone request keeps the engine's own count). If the joint call fails, each
  request is run again alone, so a text that breaks the engine fails only the request that sent it.

Rejected: a fixed-interval flush (every request pays the interval) and a window that restarts with each
arrival (a steady trickle would hold a batch open without bound).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from lamina.errors import ConfigError, EngineError
from lamina.models._engine import Engine
from lamina.models._worker_stream import EngineRunner, Timing

#: a replica's default: a fraction of one forward pass, long enough for requests sent together to meet
DEFAULT_WINDOW_S = 0.001
#: texts per joint call by default: one forward pass at the ONNX engine's default batch size
DEFAULT_MAX_TEXTS = 32


@dataclass(frozen=True)
class BatchPolicy:
    """When a replica closes a batch of embedding requests."""

    #: how long an open batch waits for company while the engine is free (0: it goes at once)
    window_s: float = DEFAULT_WINDOW_S
    #: texts per joint call; a request that would overflow the open batch starts the next one
    max_texts: int = DEFAULT_MAX_TEXTS

    def __post_init__(self) -> None:
        if not self.window_s >= 0:
            raise ConfigError(f"batch window_s must be 0 or more seconds, not {self.window_s}")
        if self.max_texts < 1:
            raise ConfigError(f"batch max_texts must be 1 or more, not {self.max_texts}")


@dataclass(frozen=True)
class OpenBatch:
    """What the policy sees: the open batch, the time, and the engine."""

    opened_at: float
    now: float
    texts: int
    #: batches of this batcher sent to the engine thread and not yet back
    in_flight: int


Reason = Literal["empty", "full", "window", "gathering", "engine busy"]


@dataclass(frozen=True)
class Decision:
    close: bool
    reason: Reason
    #: when not closing: look again after this many seconds (None: when a batch returns or a request comes)
    wait_s: float | None = None


def decide(batch: OpenBatch, policy: BatchPolicy) -> Decision:
    """Close the open batch now, or wait (and for how long)."""
    if batch.texts == 0:
        return Decision(False, "empty")
    if batch.texts >= policy.max_texts:
        return Decision(True, "full")
    if batch.in_flight:
        return Decision(False, "engine busy")
    left = batch.opened_at + policy.window_s - batch.now
    if left <= 0:
        return Decision(True, "window")
    return Decision(False, "gathering", left)


def admits(open_texts: int, incoming: int, policy: BatchPolicy) -> bool:
    """Whether a request of ``incoming`` texts joins the open batch; if not, that batch closes first.
    An empty batch takes any request, however large: it is then a batch of its own."""
    return open_texts == 0 or open_texts + incoming <= policy.max_texts


@dataclass(frozen=True)
class BatchShape:
    """The joint call a request was part of."""

    requests: int
    texts: int


@dataclass(frozen=True)
class Embedded:
    """One request's share of a batch."""

    vectors: list[list[float]]
    prompt_tokens: int
    batch: BatchShape


@dataclass
class Waiting:
    """A request in a batch: its texts, its timing (marked on the engine thread) and its answer."""

    texts: list[str]
    timing: Timing
    answer: asyncio.Future[Embedded]


Outcome = Embedded | Exception


def run_batch(engine: Engine, texts: Sequence[Sequence[str]], timings: Sequence[Timing]) -> list[Outcome]:
    """On the engine thread: embed every request's texts in one call, then hand each request its share."""
    started, start_ns = time.perf_counter(), time.time_ns()
    outcomes: list[Outcome] | None = None
    try:
        outcomes = _joint(engine, texts)
    except Exception:
        if len(texts) == 1:
            raise
    if outcomes is None:  # outside the handler, so a request's own error does not chain the joint one
        outcomes = [_alone(engine, t) for t in texts]
    finished, end_ns = time.perf_counter(), time.time_ns()
    for timing in timings:
        timing.started, timing.start_ns, timing.finished, timing.end_ns = started, start_ns, finished, end_ns
    return outcomes


def _joint(engine: Engine, texts: Sequence[Sequence[str]]) -> list[Outcome]:
    flat = [t for request in texts for t in request]
    result = engine.embed(flat)
    if len(result.vectors) != len(flat):
        raise EngineError(
            f"the engine returned {len(result.vectors)} vectors for {len(flat)} texts; retry, and report "
            "the engine if it happens again"
        )
    shape = BatchShape(len(texts), len(flat))
    if len(texts) == 1:
        return [Embedded(result.vectors, result.prompt_tokens, shape)]
    out: list[Outcome] = []
    start = 0
    for request in texts:
        tokens = sum(engine.count_tokens(t) for t in request)
        out.append(Embedded(result.vectors[start : start + len(request)], tokens, shape))
        start += len(request)
    return out


def _alone(engine: Engine, texts: Sequence[str]) -> Outcome:
    try:
        return _joint(engine, [texts])[0]
    except Exception as exc:
        return exc


class MicroBatcher:
    """Gathers concurrent embedding requests into batches and runs each batch on the engine thread.

    All of its state lives on the event loop's thread: requests arrive in :meth:`embed`, batches return
    through a done-callback, and the window is a loop timer, so it needs no lock.
    """

    def __init__(
        self,
        runner: EngineRunner,
        engine: Callable[[], Engine],
        policy: BatchPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or BatchPolicy()
        self._runner, self._engine, self._clock = runner, engine, clock
        self._open: list[Waiting] = []
        self._open_texts = 0
        self._opened_at = 0.0
        self._in_flight = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def open_requests(self) -> int:
        """Requests waiting in the open batch (not yet sent to the engine)."""
        return len(self._open)

    async def embed(self, texts: list[str], timing: Timing) -> Embedded:
        """The vectors and usage of ``texts``, embedded together with whatever arrives alongside."""
        answer: asyncio.Future[Embedded] = asyncio.get_running_loop().create_future()
        if not admits(self._open_texts, len(texts), self.policy):
            self._close()
        if not self._open:
            self._opened_at = self._clock()
        self._open.append(Waiting(texts, timing, answer))
        self._open_texts += len(texts)
        self._step()
        return await answer

    def _step(self) -> None:
        """Ask the policy about the open batch; close it, or look again when the window ends."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        state = OpenBatch(self._opened_at, self._clock(), self._open_texts, self._in_flight)
        decision = decide(state, self.policy)
        if decision.close:
            self._close()
        elif decision.wait_s is not None:
            self._timer = asyncio.get_running_loop().call_later(decision.wait_s, self._step)

    def _close(self) -> None:
        """Send the open batch to the engine thread (without the requests whose clients gave up)."""
        batch = [w for w in self._open if not w.answer.done()]
        self._open, self._open_texts = [], 0
        if not batch:
            return
        texts, timings = [w.texts for w in batch], [w.timing for w in batch]
        engine = self._engine
        returned = self._runner.call(lambda: run_batch(engine(), texts, timings))
        self._in_flight += 1
        asyncio.ensure_future(returned).add_done_callback(lambda done: self._returned(batch, done))

    def _returned(self, batch: list[Waiting], done: asyncio.Future[list[Outcome]]) -> None:
        """On the loop: answer each request of a batch back from the engine, then reconsider the open one."""
        self._in_flight -= 1
        outcomes: list[Outcome]
        if done.cancelled():
            outcomes = [EngineError("the batch was cancelled before the engine ran it; retry")] * len(batch)
        elif (failure := done.exception()) is not None:
            stopped = EngineError(f"the engine thread stopped ({failure!r}); retry")
            outcomes = [failure if isinstance(failure, Exception) else stopped] * len(batch)
        else:
            outcomes = done.result()
        for waiting, outcome in zip(batch, outcomes, strict=True):
            if waiting.answer.done():
                continue  # the client went away
            if isinstance(outcome, Exception):
                waiting.answer.set_exception(outcome)
            else:
                waiting.answer.set_result(outcome)
        if self._open:
            self._step()
