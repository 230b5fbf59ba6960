"""The engine thread with a batching engine: submitted requests are stepped, other jobs run between steps,
a request whose client left before admission costs nothing, and a stuck step shows in ``stalled``."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from lamina.errors import InvalidRequestError
from lamina.models import Delta, Usage
from lamina.models._worker_stream import EngineRunner, Timing, TokenStream


class Stepper:
    """Each submitted request gets ``length`` one-word deltas, one per step, all requests in step."""

    def __init__(self, length: int = 3) -> None:
        self.length = length
        self.running: list[tuple[TokenStream[str | Delta], int]] = []
        self.steps = 0
        self.block = threading.Event()
        self.block.set()
        self.admitted = 0

    def add(self, stream: TokenStream[str | Delta]) -> None:
        self.admitted += 1
        self.running.append((stream, 0))

    def step(self) -> bool:
        self.block.wait()
        self.steps += 1
        still = []
        for stream, done in self.running:
            if stream.cancelled:
                stream.close()
                continue
            if done + 1 == self.length:
                stream.put(Delta("w", "stop", Usage(1, self.length)))
                stream.close()
            else:
                stream.put(Delta("w"))
                still.append((stream, done + 1))
        self.running = still
        return bool(self.running)


async def drain(stream: TokenStream[str | Delta]) -> list[str | Delta]:
    items: list[str | Delta] = [await stream.first()]
    async for batch in stream.batches():
        items += batch
    return items


@pytest.mark.anyio
async def test_requests_are_stepped_together_and_calls_run_between_steps() -> None:
    runner, stepper = EngineRunner(), Stepper(length=5)
    runner.attach(stepper)

    def admit(stream: TokenStream[str | Delta]) -> None:
        stream.put("admitted")
        stepper.add(stream)

    try:
        streams = [runner.submit(admit) for _ in range(4)]
        answer = await runner.call(lambda: 42)  # not held back until the requests finish
        results = await asyncio.gather(*(drain(s) for s in streams))
        assert answer == 42
        assert all(
            len(r) == 6 and isinstance(r[-1], Delta) and r[-1].finish_reason == "stop" for r in results
        )
        assert stepper.steps <= 6  # four requests of five tokens in about five steps, not twenty
    finally:
        assert runner.close(5)


@pytest.mark.anyio
async def test_a_request_refused_at_admission_fails_its_stream() -> None:
    runner = EngineRunner()
    runner.attach(Stepper())

    def refuse(stream: TokenStream[str | Delta]) -> None:
        raise InvalidRequestError("no")

    try:
        with pytest.raises(InvalidRequestError):
            await runner.submit(refuse).first()
    finally:
        assert runner.close(5)


@pytest.mark.anyio
async def test_a_request_cancelled_while_queued_is_never_admitted() -> None:
    runner, stepper = EngineRunner(), Stepper()
    runner.attach(stepper)
    gate = threading.Event()

    def busy() -> None:
        gate.wait()

    runner.post(busy)  # the engine thread is busy
    try:
        stream: TokenStream[str | Delta] = runner.submit(stepper.add)
        stream.cancel()
        gate.set()
        assert await drain_or_end(stream)
        assert stepper.admitted == 0
    finally:
        assert runner.close(5)


async def drain_or_end(stream: TokenStream[str | Delta]) -> bool:
    try:
        await stream.first()
    except Exception as exc:  # the stream ended without an item
        return "without an answer" in str(exc)
    return False


@pytest.mark.anyio
async def test_a_stuck_step_shows_as_stalled() -> None:
    runner, stepper = EngineRunner(), Stepper(length=10**9)
    runner.attach(stepper)
    try:
        stream: TokenStream[str | Delta] = runner.submit(stepper.add)
        # stepping: not stalled (on a loaded machine the engine thread may wait for a core a while, so
        # look until it has stepped, up to 5 s, instead of once after 50 ms)
        deadline = time.monotonic() + 5
        while runner.stalled(0.5) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert runner.stalled(0.5) is None
        stepper.block.clear()
        await asyncio.sleep(0.3)
        ran = runner.stalled(0.1)
        assert ran is not None and ran >= 0.1
        stepper.block.set()
        stream.cancel()
        await asyncio.sleep(0.05)
        assert runner.stalled(0.1) is None
    finally:
        stepper.block.set()
        assert runner.close(5)


def test_closing_ends_every_running_request() -> None:
    async def run() -> list[str | Delta]:
        runner, stepper = EngineRunner(), Stepper(length=10**6)
        runner.attach(stepper)
        stream: TokenStream[str | Delta] = runner.submit(stepper.add)
        await asyncio.sleep(0.05)
        started = time.monotonic()
        assert await asyncio.to_thread(runner.close, 5)
        assert time.monotonic() - started < 2
        return [item async for batch in stream.batches() for item in batch]

    assert asyncio.run(run())  # it got items and then the end, instead of hanging


class SlowStepper(Stepper):
    """Each step takes about 20 ms, whatever the batch holds (a weights pass, as on a CPU)."""

    def step(self) -> bool:
        time.sleep(0.02)
        return super().step()


@pytest.mark.anyio
async def test_requests_in_one_batch_share_its_time() -> None:
    """compute_ms (what the cost of a request is based on): alone, its whole engine time; four in one
    batch, a quarter each, summing to the time of the steps."""
    runner, stepper = EngineRunner(), SlowStepper(length=5)
    runner.attach(stepper)
    timings = [Timing(received=time.perf_counter()) for _ in range(4)]

    def admitter(timing: Timing) -> Callable[[TokenStream[str | Delta]], None]:
        def admit(stream: TokenStream[str | Delta]) -> None:
            timing.begin(runner.busy)
            stream.put("admitted")
            stepper.add(_Ending(stream, timing))  # type: ignore[arg-type]

        return admit

    try:
        await asyncio.gather(*(drain(runner.submit(admitter(t))) for t in timings))
        shares = [t.as_json(None)["compute_ms"] for t in timings]
        walls = [t.as_json(None)["engine_ms"] for t in timings]
        steps_ms = stepper.steps * 20
        assert sum(shares) == pytest.approx(steps_ms, rel=0.5)
        assert all(share < wall / 2 for share, wall in zip(shares, walls, strict=True))
        alone = Timing(received=time.perf_counter())
        await drain(runner.submit(admitter(alone)))
        assert alone.as_json(None)["compute_ms"] == pytest.approx(alone.as_json(None)["engine_ms"], rel=0.3)
    finally:
        assert runner.close(5)


class _Ending:
    """A stream whose request ends (its timing with it) when its last delta is put, as TimedSink does."""

    def __init__(self, stream: TokenStream[str | Delta], timing: Timing) -> None:
        self._stream, self._timing = stream, timing

    @property
    def cancelled(self) -> bool:
        return self._stream.cancelled

    def put(self, item: str | Delta) -> None:
        if isinstance(item, Delta) and item.finish_reason is not None:
            self._timing.end()
        self._stream.put(item)

    def close(self) -> None:
        self._stream.close()


@pytest.mark.anyio
async def test_requests_sent_together_to_an_idle_engine_start_in_one_step() -> None:
    """The first request waits for company (``gather_s`` without a newcomer), so a burst is prefilled in
    one step; with no gathering the first request is stepped alone before the others are admitted."""

    async def burst(runner: EngineRunner) -> list[int]:
        stepper, at_first_step = Stepper(length=2), []
        real_step = stepper.step

        def step() -> bool:
            if stepper.steps == 0:
                at_first_step.append(stepper.admitted)
            return real_step()

        stepper.step = step  # type: ignore[method-assign]
        runner.attach(stepper)
        streams = []
        for _ in range(4):  # arrivals 10 ms apart, as from a gateway relaying a client's burst
            streams.append(runner.submit(stepper.add))
            await asyncio.sleep(0.01)
        await asyncio.gather(*(drain(s) for s in streams))
        return at_first_step

    gathering, plain = EngineRunner(gather_s=0.1), EngineRunner()
    try:
        began = time.monotonic()
        assert await burst(gathering) == [4]
        assert time.monotonic() - began < 0.4 + 1.0  # 4 x 100 ms at most, however slow the machine
        assert (await burst(plain))[0] < 4
    finally:
        assert gathering.close(5) and plain.close(5)


@pytest.mark.anyio
async def test_a_flush_delivers_a_steps_items_before_the_step_ends() -> None:
    """A long step (a decode, then a long prompt's prefill) hands the decoded tokens over as soon as the
    engine flushes, not when the whole step ends."""
    runner = EngineRunner()
    release = threading.Event()

    class TwoParts:
        def __init__(self) -> None:
            self.stream: TokenStream[str | Delta] | None = None

        def step(self) -> bool:
            assert self.stream is not None
            self.stream.put(Delta("early"))
            self.stream.flush()
            release.wait(10)  # the rest of the step (the prefill) takes its time
            self.stream.put(Delta("late", "stop", Usage(1, 2)))
            self.stream.close()
            return False

    engine = TwoParts()
    runner.attach(engine)

    def admit(stream: TokenStream[str | Delta]) -> None:
        stream.put("admitted")
        engine.stream = stream

    try:
        stream = runner.submit(admit)
        assert await stream.first() == "admitted"
        batches = stream.batches()
        early = await asyncio.wait_for(anext(batches), 5)  # while the step still runs
        assert [d.text for d in early if isinstance(d, Delta)] == ["early"]
        release.set()
        late = await asyncio.wait_for(anext(batches), 5)
        assert [d.text for d in late if isinstance(d, Delta)] == ["late"]
    finally:
        release.set()
        assert runner.close(5)
