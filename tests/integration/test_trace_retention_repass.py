"""Retention's re-pass on SQLite (``TraceRetention.run_once``, :data:`REPASSES`): a pass by size that finds
the trace tables past their bound again when it ends runs again. The writes that race a real pass are made
here inside it, after its deletions and before its last measurement, so each test decides, every run,
whether a pass ends past the bound (real SQLite, real traces)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import select

from lamina.observability import RetentionPolicy, SamplingPolicy, TraceRetention, TraceSampler, _traces
from lamina.observability._keeper import TraceKeeper
from lamina.observability._store_exporter import SpanWriter
from lamina.observability._trace_size import stored_bytes
from lamina.store import Store, traces
from tests.support.traces import chat_trace

#: the trace tables' byte bound: about 180 request-shaped traces (2.9 KB each on SQLite)
BOUND = 512 << 10


class Writer:
    """Writes request-shaped traces through a real tracer and the store's span writer, remembering their ids
    in the order written."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sent: list[str] = []
        self._provider = TracerProvider(shutdown_on_exit=False)
        self._provider.add_span_processor(
            TraceKeeper(TraceSampler(SamplingPolicy(per_s=1e9)), SpanWriter(store, linger_s=0.0))
        )
        self._tracer = self._provider.get_tracer("t")

    def stored(self) -> int:
        with self.store.begin() as conn:
            return stored_bytes(conn)

    def fill_past(self, share: float) -> None:
        """Write traces, five at a time, until the trace tables hold more than ``share`` of the bound."""
        while True:
            self.sent += [chat_trace(self._tracer, len(self.sent)) for _ in range(5)]
            assert self._provider.force_flush()
            if self.stored() > share * BOUND:
                return

    def kept(self) -> list[str]:
        with self.store.begin() as conn:
            return list(conn.execute(select(traces.c.trace_id).order_by(traces.c.start_ns)).scalars())

    def close(self) -> None:
        self._provider.shutdown()


class RefilledRetention(TraceRetention):
    """Retention that counts its passes, and whose first ``refills`` passes by size are refilled to past
    ``refill_to`` of the bound right after they deleted (as a writer faster than the pass would)."""

    def __init__(self, writer: Writer, *, refills: int, refill_to: float = 1.0) -> None:
        super().__init__(writer.store, RetentionPolicy(max_bytes=BOUND))
        self.writer, self.refills, self.refill_to = writer, refills, refill_to
        self.passes = 0
        #: the ids written inside the passes
        self.during: list[str] = []

    def _pass(self) -> _traces._Pass:
        self.passes += 1
        return super()._pass()

    def _reclaim(self) -> None:
        if self.passes <= self.refills:
            before = len(self.writer.sent)
            self.writer.fill_past(self.refill_to)
            self.during += self.writer.sent[before:]
        super()._reclaim()


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Writer]:
    """A writer on a fresh SQLite store whose trace tables are already past the bound."""
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    w = Writer(store)
    w.fill_past(1.0)
    yield w
    w.close()
    store.close()


def test_a_pass_refilled_past_the_bound_while_deleting_passes_again_and_ends_within_it(
    writer: Writer,
) -> None:
    retention = RefilledRetention(writer, refills=1)
    pruned = retention.run_once()
    assert retention.passes == 2
    assert pruned.stored_bytes == writer.stored() <= BOUND
    kept = writer.kept()
    assert set(retention.during) <= set(kept)  # the traces written during the pass are kept ...
    assert kept == writer.sent[-len(kept) :]  # ... and the kept ones are the newest, none missing


def test_without_repasses_the_same_pass_ends_past_the_bound(
    writer: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control of the test above: it fails without the re-pass."""
    monkeypatch.setattr(_traces, "REPASSES", 0)
    retention = RefilledRetention(writer, refills=1)
    pruned = retention.run_once()
    assert retention.passes == 1
    assert pruned.stored_bytes == writer.stored() > BOUND


def test_a_pass_refilled_every_time_stops_after_its_repasses(writer: Writer) -> None:
    retention = RefilledRetention(writer, refills=1_000)  # every pass
    pruned = retention.run_once()
    assert retention.passes == 1 + _traces.REPASSES
    assert pruned.stored_bytes == writer.stored() > BOUND  # it says where it stopped


@pytest.mark.parametrize(
    ("refills", "refill_to"), [(0, 0.0), (1, 0.9)], ids=["not-refilled", "refilled-within-the-bound"]
)
def test_a_pass_that_ends_within_the_bound_runs_once(writer: Writer, refills: int, refill_to: float) -> None:
    retention = RefilledRetention(writer, refills=refills, refill_to=refill_to)
    pruned = retention.run_once()
    assert retention.passes == 1
    assert pruned.traces > 0  # a pass by size
    assert refill_to * BOUND < pruned.stored_bytes == writer.stored() <= BOUND


def test_a_run_after_the_writes_stopped_brings_tables_left_past_the_bound_back_within_it(
    writer: Writer,
) -> None:
    """A run whose re-passes were spent past the bound: the next one, with nothing written since, prunes
    (it used to compare with its own last measurement, see no growth and leave them past the bound)."""
    retention = RefilledRetention(writer, refills=1_000)
    assert retention.run_once().stored_bytes > BOUND
    retention.refills = 0  # the writes stop
    pruned = retention.run_once()
    assert pruned.traces > 0
    assert pruned.stored_bytes == writer.stored() <= BOUND


def test_the_background_loop_runs_again_at_its_next_probe_when_a_run_ended_past_the_bound(
    writer: Writer,
) -> None:
    """The first run is refilled in each of its passes and ends past the bound; nothing is written after
    it, so no probe sees growth and the interval is an hour away: the next probe runs again all the same."""
    retention = RefilledRetention(writer, refills=1 + _traces.REPASSES)
    retention.start(interval_s=3600.0)
    try:
        deadline = time.monotonic() + 30
        while not (retention.passes > 1 + _traces.REPASSES and writer.stored() <= BOUND):
            assert time.monotonic() < deadline, (retention.passes, writer.stored())
            time.sleep(0.2)
    finally:
        retention.stop()
