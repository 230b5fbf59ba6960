"""The thread that writes budget reservations, settlements and ledger rows to the metadata store.

One thread per cost policy applies them in the order they come, all those waiting in one transaction: the
commit is most of the cost (on SQLite, an fsync), so a busy gateway pays it once per batch, not per call.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime

from lamina.application._budgets import (
    Budget,
    CostLedger,
    Hold,
    LedgerEntry,
    Outcome,
    Reservation,
    Settlement,
)
from lamina.errors import BudgetExceededError, UnavailableError

log = logging.getLogger("lamina.costs")


@dataclass
class _Queued:
    op: Reservation | Settlement
    #: a reservation's outcome; None for a settlement (nobody waits for it)
    future: Future[Outcome] | None = None
    attempts: int = 0


@dataclass
class _WriterState:
    """What the writer thread shares with the policy (not the policy itself, so that it can be collected)."""

    ledger: CostLedger
    linger_s: float
    max_batch: int
    queue: queue.SimpleQueue[_Queued | None] = field(default_factory=queue.SimpleQueue)
    changed: threading.Condition = field(default_factory=threading.Condition)
    submitted: int = 0
    done: int = 0

    def put(self, item: _Queued) -> None:
        with self.changed:
            self.submitted += 1
        self.queue.put(item)


class LedgerWriter:
    """One thread per policy that applies reservations and settlements to the ledger in the order they
    come, all those waiting in one transaction: the commit is most of the cost (on SQLite, an fsync), so a
    busy gateway pays it once per batch, not per call. A settlement waits up to ``linger_s`` for company and
    nobody waits for it (the answer is already out; its hold stays until then, which can only refuse more,
    never spend more); a reservation goes at once, with whatever is queued before it. Past ``max_backlog``
    unwritten changes (a store slower than the calls), admission waits in :meth:`room`."""

    def __init__(
        self, ledger: CostLedger, linger_s: float = 0.05, max_batch: int = 256, max_backlog: int = 10_000
    ) -> None:
        self._state = _WriterState(ledger, linger_s, max_batch)
        self._max_backlog = max_backlog
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def _submit(self, item: _Queued) -> None:
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_write_forever, args=(self._state,), name="lamina-cost-ledger", daemon=True
                )
                self._thread.start()
                weakref.finalize(self, _stop, self._state, self._thread)  # at exit, or when collected
        self._state.put(item)

    async def reserve(
        self, budgets: Sequence[Budget], nusd: int, now: datetime, unused: Mapping[str, int] | None = None
    ) -> list[Hold]:
        """Hold ``nusd`` against every budget in the store, all or none (BudgetExceededError)."""
        future: Future[Outcome] = Future()
        self._submit(_Queued(Reservation(budgets, nusd, now, dict(unused or {})), future))
        try:
            outcome = await asyncio.wrap_future(future)
        except BaseException:  # the caller left (cancelled): what is taken after that goes back
            future.add_done_callback(self._give_back)
            raise
        if isinstance(outcome, BudgetExceededError):
            raise outcome
        return outcome

    def _give_back(self, future: Future[Outcome]) -> None:
        if not future.cancelled() and future.exception() is None:
            outcome = future.result()
            if isinstance(outcome, list):
                self.settle(outcome, 0, None)

    def settle(self, holds: Sequence[Hold], cost_nusd: int, entry: LedgerEntry | None) -> None:
        if holds or entry is not None:
            self._submit(_Queued(Settlement(holds, cost_nusd, entry)))

    @property
    def backlog(self) -> int:
        """Reservations and settlements submitted and not written yet."""
        return self._state.submitted - self._state.done

    async def room(self, wait_s: float = 10.0, poll_s: float = 0.01) -> None:
        """Return once at most ``max_backlog`` changes wait to be written: admission waits here, so a
        store slower than the calls holds calls back instead of queueing their settlements (and memory)
        without end. After ``wait_s`` the call is refused (503, Retry-After) rather than left hanging."""
        if self.backlog <= self._max_backlog:
            return
        deadline = time.monotonic() + wait_s
        while self.backlog > self._max_backlog:
            if time.monotonic() >= deadline:
                raise UnavailableError(
                    f"the cost ledger is {self.backlog} changes behind (at most {self._max_backlog}): the "
                    "metadata store is slower than the calls, or down; check it (`lamina doctor`) and retry",
                    headers={"Retry-After": "5"},
                )
            await asyncio.sleep(poll_s)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything submitted so far is written (False if that took over ``timeout_s``)."""
        state = self._state
        with state.changed:
            target = state.submitted
            return state.changed.wait_for(lambda: state.done >= target, timeout_s)

    def close(self) -> None:
        """Write what is queued and stop the thread (a later call starts another)."""
        with self._start:
            thread, self._thread = self._thread, None
        if thread is not None:
            _stop(self._state, thread)


def _stop(state: _WriterState, thread: threading.Thread) -> None:
    if thread.is_alive():
        state.queue.put(None)
        thread.join(30.0)


def _write_forever(state: _WriterState) -> None:
    while (first := state.queue.get()) is not None:
        batch, deadline = [first], time.monotonic() + state.linger_s
        waiting = first.future is not None  # a reservation waits: take only what is queued already
        while len(batch) < state.max_batch:
            timeout = 0.0 if waiting else deadline - time.monotonic()
            try:
                item = state.queue.get(timeout=timeout) if timeout > 0 else state.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # stop, after this batch
                _write(state, batch)
                return
            batch.append(item)
            waiting = waiting or item.future is not None
        _write(state, batch)


def _write(state: _WriterState, batch: list[_Queued]) -> None:
    live = [q for q in batch if q.future is None or q.future.set_running_or_notify_cancel()]
    try:
        outcomes = iter(state.ledger.apply([q.op for q in live]))
    except Exception as exc:  # the store failed: reservations fail with it, settlements are tried again
        log.exception("writing %d budget and ledger changes failed", len(live))
        for q in live:
            if q.future is not None:
                q.future.set_exception(exc)
        retry = [q for q in live if q.future is None and q.attempts < 5]
        if len(retry) < sum(q.future is None for q in live):
            log.error("gave up on settlements after 5 attempts; their holds stay until the period ends")
        if retry:
            time.sleep(0.5)
            for q in retry:
                state.put(_Queued(q.op, None, q.attempts + 1))
    else:
        for q in live:
            if q.future is not None:
                q.future.set_result(next(outcomes))
    finally:
        with state.changed:
            state.done += len(batch)
            state.changed.notify_all()
