"""The replica worker's engine thread, the jobs it runs, the hand-off of tokens to the loop.

One engine, one thread. An engine that batches (capability ``batching``) gets its requests submitted and
is stepped whenever it has work, with other jobs (token counts, embeddings, admissions) run between steps;
any other engine runs its requests one at a time, FIFO, so many clients all get answers and none sees a
"busy" error. A request that finds a batching engine idle waits, before the first step, until no other
request has arrived for ``gather_s`` (the deployment's ``batching.gather_ms``): requests sent together
are then prefilled in one step, where otherwise the first would be prefilled alone and the rest would wait
for that whole step. The thread notes when its current job or step began, so a stuck engine shows in the
health check. Tokens cross from the engine thread to the event loop through ``loop.call_soon_threadsafe``
onto an ``asyncio.Queue``; the HTTP side drains whatever has arrived in one write.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from lamina.errors import EngineError, UnavailableError

T = TypeVar("T")
X = TypeVar("X")


@dataclass(eq=False)  # hashed by identity: a BusyShare holds a set of them
class Timing:
    """Where one request's time went; marked on the engine thread, read once the request is done."""

    received: float
    started: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    start_ns: int = 0
    end_ns: int = 0
    #: engine seconds charged to this request by a batching engine: its share of each step it rode in
    compute_s: float = 0.0
    #: the batch this request rides in while it runs (a batching engine's), else None
    share: BusyShare | None = None

    def begin(self, share: BusyShare | None = None) -> None:
        self.started, self.start_ns = time.perf_counter(), time.time_ns()
        if share is not None:
            self.share = share
            share.join(self)

    def end(self) -> None:
        self.finished, self.end_ns = time.perf_counter(), time.time_ns()
        if self.share is not None:
            self.share.leave(self)
            self.share = None

    def as_json(self, model_version: str | None) -> dict[str, Any]:
        """The ``lamina`` extension field; ``ttft_ms`` counts from the worker's receipt of the request."""
        first = self.first_token or self.finished
        return {
            "queue_ms": round((self.started - self.received) * 1000, 3),
            "engine_ms": round((self.finished - self.started) * 1000, 3),
            # the engine time this request accounts for (its cost): alone, all of it; in a batch, its share
            "compute_ms": round(
                (self.compute_s if self.compute_s else self.finished - self.started) * 1000, 3
            ),
            "ttft_ms": round((first - self.received) * 1000, 3),
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "model_version": model_version,
        }


class BusyShare:
    """The requests a batching engine is running; each step's time is split evenly among them (engine
    thread only). Even, not by tokens: a step's cost is mostly the weights' pass, shared by the batch."""

    def __init__(self) -> None:
        self._running: set[Timing] = set()

    def join(self, timing: Timing) -> None:
        self._running.add(timing)

    def leave(self, timing: Timing) -> None:
        self._running.discard(timing)

    def charge(self, seconds: float) -> None:
        if self._running:
            share = seconds / len(self._running)
            for timing in self._running:
                timing.compute_s += share


class EngineRunner:
    """A single thread that runs engine jobs one at a time, in the order they were submitted."""

    def __init__(self, gather_s: float = 0.0) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        #: an idle batching engine's first step waits until no request has arrived for this long
        self._gather_s = gather_s
        #: while gathering: when the first request arrived and when the latest one did (monotonic)
        self._gather: tuple[float, float] | None = None
        #: set on shutdown: queued jobs are skipped and running ones stop at their next token
        self.closing = False
        self._stepper: Stepper | None = None
        self._stepping = False
        #: when the current job or step began (monotonic), None while the thread waits for work
        self._since: float | None = None
        #: items handed to streams during a step, delivered together after it (one wake-up of the loop)
        self._outbox: list[tuple[TokenStream[Any], object]] | None = None
        #: the requests of the attached batching engine, charged each step's time
        self.busy = BusyShare()
        self._thread = threading.Thread(target=self._run, name="lamina-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is None:
                break
            self._since = time.monotonic()
            try:
                job()
            finally:
                self._since = None
        # whatever the engine still holds is cancelled now (closing): one step lets it all go
        while self._stepper is not None and self._stepping:
            self._stepping = self._stepper.step()

    def _next(self) -> Callable[[], None] | None:
        if not self._stepping:
            return self._jobs.get()
        try:
            return self._jobs.get_nowait()
        except queue.Empty:
            pass
        wait = self._gather_wait()
        if wait > 0:
            try:
                return self._jobs.get(timeout=wait)
            except queue.Empty:
                pass
        self._gather = None
        return self._step

    def _gather_wait(self) -> float:
        """Seconds the first step of a batch still waits for company: until ``gather_s`` without a new
        request, four times that since the first at most."""
        if self._gather is None:
            return 0.0
        first, latest = self._gather
        return min(latest + self._gather_s, first + 4 * self._gather_s) - time.monotonic()

    def _arrived(self, idle: bool) -> None:
        """A request was admitted; one that finds the engine idle opens the gathering."""
        now = time.monotonic()
        if idle and self._gather_s > 0:
            self._gather = (now, now)
        elif self._gather is not None:
            self._gather = (self._gather[0], now)

    def _step(self) -> None:
        """One step of the batching engine; what it hands to streams crosses to the loop in one go."""
        assert self._stepper is not None
        self._outbox = []
        began = time.perf_counter()
        try:
            self._stepping = self._stepper.step()
        finally:
            self.busy.charge(time.perf_counter() - began)
            outbox, self._outbox = self._outbox, None
            if outbox:
                _deliver(outbox)

    def flush(self) -> None:
        """On the engine thread, during a step: deliver its items so far, and gather the rest anew."""
        outbox = self._outbox
        if outbox:
            self._outbox = []
            _deliver(outbox)

    def attach(self, stepper: Stepper) -> None:
        """Step ``stepper`` (a batching engine) whenever it has work; call on the engine thread."""
        self._stepper = stepper

    def progress(self) -> None:
        """The current job made progress (a job that streams calls this per item)."""
        if self._since is not None:
            self._since = time.monotonic()

    def stalled(self, limit_s: float) -> float | None:
        """How long the current job or step has run without progress, if more than ``limit_s``; else None."""
        since = self._since
        if since is None:
            return None
        ran = time.monotonic() - since
        return ran if ran > limit_s else None

    def post(self, job: Callable[[], None]) -> None:
        """Queue a job that handles its own errors."""
        self._jobs.put(job)

    def call(self, fn: Callable[[], T]) -> Awaitable[T]:
        """Run ``fn`` on the engine thread; await its result (or its exception) on the event loop."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the caller gave up waiting
            if self.closing:
                future.set_exception(UnavailableError("this replica is shutting down; retry on another"))
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._jobs.put(job)
        return asyncio.wrap_future(future)

    def stream(self, make: Callable[[], Iterator[X]]) -> TokenStream[X]:
        """Run the iterator ``make()`` on the engine thread, handing each item to the event loop."""
        stream: TokenStream[X] = TokenStream(asyncio.get_running_loop(), self)
        self._jobs.put(lambda: stream.pump(make))
        return stream

    def submit(self, admit: Callable[[TokenStream[X]], None]) -> TokenStream[X]:
        """Run ``admit(stream)`` on the engine thread, which hands the request to the attached batching
        engine with the stream as its sink; the engine is stepped from then on."""
        stream: TokenStream[X] = TokenStream(asyncio.get_running_loop(), self)

        def job() -> None:
            if stream.cancelled:  # the client left while the request was queued: no work at all
                stream.close()
                return
            try:
                admit(stream)
            except BaseException as exc:
                stream.fail(exc)
                stream.close()
                return
            self._arrived(idle=not self._stepping)
            self._stepping = True

        self._jobs.put(job)
        return stream

    def close(self, timeout_s: float) -> bool:
        """Stop after the current job (which stops at its next token); True once the thread has ended."""
        self.closing = True
        self._jobs.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


@dataclass(frozen=True)
class _Failure:
    exc: BaseException


_END = object()


class Stepper(Protocol):
    def step(self) -> bool: ...


class TokenStream(Generic[X]):
    """Items of one request, produced on the engine thread and consumed on the event loop.

    It is also the request's sink for a batching engine (``put``, ``fail``, ``close``, ``cancelled``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, runner: EngineRunner) -> None:
        self._loop = loop
        self._runner = runner
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled or self._runner.closing

    def cancel(self) -> None:
        """Stop generating at the next item (the client went away, or the response ended)."""
        self._cancelled = True

    def put(self, item: X) -> None:
        self._push(item)

    def flush(self) -> None:
        """Deliver what the current step handed to streams so far (see ``Sink.flush``)."""
        if threading.current_thread() is self._runner._thread:
            self._runner.flush()

    def fail(self, exc: BaseException) -> None:
        self._push(_Failure(exc))

    def close(self) -> None:
        self._push(_END)

    def pump(self, make: Callable[[], Iterator[X]]) -> None:
        """The engine-thread side: iterate, hand over, and always close the iterator and signal the end."""
        if self.cancelled:
            self._push(_END)
            return
        push, iterator = self._push, None
        try:
            iterator = make()
            for item in iterator:
                push(item)
                self._runner.progress()
                if self.cancelled:
                    break
        except BaseException as exc:
            push(_Failure(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            push(_END)

    def _push(self, item: object) -> None:
        outbox = self._runner._outbox
        if outbox is not None and threading.current_thread() is self._runner._thread:
            outbox.append((self, item))
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled = True

    async def first(self) -> X:
        """The first item, or the exception the engine raised before producing one."""
        item = await self._queue.get()
        if isinstance(item, _Failure):
            raise item.exc
        if item is _END:
            raise EngineError("the engine ended the request without an answer; retry it")
        return cast(X, item)

    async def batches(self) -> AsyncIterator[list[X]]:
        """Every item after the first, grouped by what had arrived when the consumer looked."""
        while True:
            arrived = [await self._queue.get()]
            while not self._queue.empty():
                arrived.append(self._queue.get_nowait())
            out: list[X] = []
            for item in arrived:
                if item is _END or isinstance(item, _Failure):
                    if out:
                        yield out
                    if isinstance(item, _Failure):
                        raise item.exc
                    return
                out.append(cast(X, item))
            yield out


def _deliver(outbox: list[tuple[TokenStream[Any], object]]) -> None:
    """Hand items to their streams' queues with one ``call_soon_threadsafe`` per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[TokenStream[Any], object]]] = {}
    for stream, item in outbox:
        by_loop.setdefault(stream._loop, []).append((stream, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            for stream, _ in items:
                stream._cancelled = True


def _put_all(items: list[tuple[TokenStream[Any], object]]) -> None:
    for stream, item in items:
        stream._queue.put_nowait(item)
