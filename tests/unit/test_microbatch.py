"""Micro-batching of embedding requests: the closing policy (table-driven, fake clock), the engine-thread
split of one joint call into each request's share, and the gathering loop on a real engine thread with an
engine that holds its first call until told, so "arrived while the engine was busy" is a fact, not a race."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import anyio
import httpx
import numpy as np
import pytest

from lamina.errors import ConfigError, EngineError, UnavailableError
from lamina.models import Capability, ChatMessage, Delta, EmbeddingBatch, EngineInfo, SamplingParams
from lamina.models._microbatch import (
    BatchPolicy,
    Decision,
    Embedded,
    MicroBatcher,
    OpenBatch,
    admits,
    decide,
    run_batch,
)
from lamina.models._worker_app import Replica, WorkerApp
from lamina.models._worker_stream import EngineRunner, Timing
from tests.support import FakeClock

#: how long a test waits for the engine thread before calling it a hang (not a timing assertion)
HANG_S = 10.0


class GateEngine:
    """An embedding engine that records its calls, can hold them until released, and fails on ``boom``.

    Tokens are words; vectors are unit vectors seeded by a hash of the text, so equal texts give equal
    vectors in any batch.
    """

    def __init__(self, hold: bool = False, broken: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.broken = broken

    def info(self) -> EngineInfo:
        return EngineInfo("gate", frozenset({Capability.EMBEDDING}), context_length=64, embedding_dim=4)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def count_chat_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(self.count_tokens(m.content) for m in messages)

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Iterator[Delta]:
        raise NotImplementedError

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        raise NotImplementedError

    def embed(self, texts: Sequence[str]) -> EmbeddingBatch:
        self.calls.append(list(texts))
        self.entered.set()
        assert self.release.wait(HANG_S), "the test never released the engine"
        if self.broken:
            raise RuntimeError("the engine is broken")
        if "boom" in texts:
            raise ValueError("this engine cannot embed 'boom'")
        return EmbeddingBatch([vector(t) for t in texts], sum(self.count_tokens(t) for t in texts))

    def close(self) -> None:
        """Nothing to release."""


def vector(text: str) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(4)
    return [float(x) for x in v / np.linalg.norm(v)]


# -- the policy ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    texts: int
    in_flight: int
    elapsed_s: float
    expected: Decision
    policy: BatchPolicy | None = None


DECISIONS = {
    "nothing open": Case(0, 0, 5.0, Decision(False, "empty")),
    "just opened, engine free: gather": Case(1, 0, 0.0, Decision(False, "gathering", 0.002)),
    "half the window gone": Case(3, 0, 0.0015, Decision(False, "gathering", 0.0005)),
    "window over, engine free": Case(3, 0, 0.002, Decision(True, "window")),
    "long past the window": Case(1, 0, 9.0, Decision(True, "window")),
    "window over, engine busy: keep gathering": Case(3, 1, 0.5, Decision(False, "engine busy")),
    "cap reached at once": Case(8, 0, 0.0, Decision(True, "full")),
    "cap reached while the engine is busy": Case(9, 2, 0.0, Decision(True, "full")),
    "no window: the engine is free, go": Case(1, 0, 0.0, Decision(True, "window"), BatchPolicy(window_s=0)),
    "no window, engine busy: wait": Case(1, 1, 0.0, Decision(False, "engine busy"), BatchPolicy(window_s=0)),
    "cap of one: every request alone": Case(1, 1, 0.0, Decision(True, "full"), BatchPolicy(max_texts=1)),
}


@pytest.mark.parametrize("case", DECISIONS.values(), ids=DECISIONS.keys())
def test_decide(case: Case) -> None:
    clock = FakeClock()
    opened = clock.monotonic()
    clock.advance(case.elapsed_s)
    policy = case.policy or BatchPolicy(window_s=0.002, max_texts=8)
    got = decide(OpenBatch(opened, clock.monotonic(), case.texts, case.in_flight), policy)
    assert (got.close, got.reason) == (case.expected.close, case.expected.reason)
    if case.expected.wait_s is None:
        assert got.wait_s is None
    else:
        assert got.wait_s == pytest.approx(case.expected.wait_s, abs=1e-5)


@pytest.mark.parametrize(
    ("open_texts", "incoming", "joins"),
    [(0, 1, True), (0, 500, True), (5, 3, True), (5, 4, False), (8, 1, False), (1, 8, False)],
)
def test_admits(open_texts: int, incoming: int, joins: bool) -> None:
    assert admits(open_texts, incoming, BatchPolicy(max_texts=8)) is joins


@pytest.mark.parametrize(("window_s", "max_texts"), [(-0.001, 8), (float("nan"), 8), (0.001, 0)])
def test_policy_refuses_nonsense(window_s: float, max_texts: int) -> None:
    with pytest.raises(ConfigError, match="must be"):
        BatchPolicy(window_s=window_s, max_texts=max_texts)


# -- the engine-thread split -----------------------------------------------------------------------------


def timings(n: int) -> list[Timing]:
    return [Timing(received=0.0) for _ in range(n)]


def test_each_request_gets_its_own_vectors_and_tokens() -> None:
    engine, marks = GateEngine(), timings(3)
    requests = [["one two", "three"], ["four five six"], ["seven", "eight nine", "ten"]]
    out = run_batch(engine, requests, marks)
    assert engine.calls == [[t for r in requests for t in r]]
    for texts, got in zip(requests, out, strict=True):
        assert isinstance(got, Embedded)
        assert got.vectors == [vector(t) for t in texts]
        assert got.prompt_tokens == sum(len(t.split()) for t in texts)
        assert (got.batch.requests, got.batch.texts) == (3, 6)
    assert all(m.started == marks[0].started > 0 and m.finished >= m.started for m in marks)
    assert all(m.end_ns >= m.start_ns > 0 for m in marks)


def test_a_text_that_breaks_the_joint_call_fails_only_its_request() -> None:
    engine = GateEngine()
    out = run_batch(engine, [["fine"], ["boom"], ["also fine"]], timings(3))
    assert engine.calls == [["fine", "boom", "also fine"], ["fine"], ["boom"], ["also fine"]]
    assert isinstance(out[0], Embedded) and out[0].vectors == [vector("fine")]
    assert isinstance(out[1], ValueError)
    assert isinstance(out[2], Embedded) and out[2].batch.requests == 1


def test_a_lone_request_raises_its_engine_error() -> None:
    with pytest.raises(ValueError, match="boom"):
        run_batch(GateEngine(), [["boom"]], timings(1))


def test_a_wrong_number_of_vectors_is_an_engine_error() -> None:
    class Short(GateEngine):
        def embed(self, texts: Sequence[str]) -> EmbeddingBatch:
            return EmbeddingBatch([vector("x")], 1)

    with pytest.raises(EngineError, match="returned 1 vectors for 2 texts"):
        run_batch(Short(), [["a", "b"]], timings(1))


# -- the gathering loop ----------------------------------------------------------------------------------

pytestmark = pytest.mark.anyio


@pytest.fixture
def runner() -> Iterator[EngineRunner]:
    r = EngineRunner()
    yield r
    assert r.close(HANG_S)


async def wait_entered(engine: GateEngine) -> None:
    assert await asyncio.to_thread(engine.entered.wait, HANG_S)


async def until_open(batcher: MicroBatcher, requests: int) -> None:
    """Let the loop run until ``requests`` requests wait in the open batch."""
    with anyio.fail_after(HANG_S):  # a guard against hanging, not a timing assertion
        while batcher.open_requests < requests:
            await asyncio.sleep(0)


async def test_requests_that_arrive_while_the_engine_is_busy_share_one_call(runner: EngineRunner) -> None:
    engine = GateEngine(hold=True)
    batcher = MicroBatcher(runner, lambda: engine, BatchPolicy(window_s=0, max_texts=32))
    first = asyncio.ensure_future(batcher.embed(["first"], Timing(0.0)))
    await wait_entered(engine)
    later = [asyncio.ensure_future(batcher.embed([f"text {i}"], Timing(0.0))) for i in range(5)]
    await until_open(batcher, 5)
    engine.release.set()
    got = await asyncio.wait_for(asyncio.gather(first, *later), HANG_S)
    assert engine.calls == [["first"], [f"text {i}" for i in range(5)]]
    assert got[0].vectors == [vector("first")] and got[0].batch.requests == 1
    for i, share in enumerate(got[1:]):
        assert share.vectors == [vector(f"text {i}")] and share.prompt_tokens == 2
        assert share.batch.requests == 5


async def test_a_full_batch_goes_without_waiting_for_the_window(runner: EngineRunner) -> None:
    engine = GateEngine()
    batcher = MicroBatcher(runner, lambda: engine, BatchPolicy(window_s=3600, max_texts=4))
    asks = [batcher.embed([f"t{i}", f"u{i}"], Timing(0.0)) for i in range(2)]
    got = await asyncio.wait_for(asyncio.gather(*asks), HANG_S)  # an hour's window would hang here
    assert engine.calls == [["t0", "u0", "t1", "u1"]]
    assert [g.vectors for g in got] == [[vector("t0"), vector("u0")], [vector("t1"), vector("u1")]]


async def test_a_request_that_would_overflow_starts_the_next_batch(runner: EngineRunner) -> None:
    engine = GateEngine(hold=True)
    batcher = MicroBatcher(runner, lambda: engine, BatchPolicy(window_s=0, max_texts=3))
    first = asyncio.ensure_future(batcher.embed(["busy"], Timing(0.0)))
    await wait_entered(engine)
    asks = [asyncio.ensure_future(batcher.embed(texts, Timing(0.0))) for texts in (["a", "b"], ["c", "d"])]
    await until_open(batcher, 1)  # ["a", "b"] went to the engine's queue when ["c", "d"] could not join
    engine.release.set()
    await asyncio.wait_for(asyncio.gather(first, *asks), HANG_S)
    assert engine.calls == [["busy"], ["a", "b"], ["c", "d"]]


async def test_a_lone_request_goes_once_its_window_ends(runner: EngineRunner) -> None:
    engine = GateEngine()
    batcher = MicroBatcher(runner, lambda: engine, BatchPolicy(window_s=0.001))
    got = await asyncio.wait_for(batcher.embed(["alone"], Timing(0.0)), HANG_S)
    assert got.vectors == [vector("alone")] and engine.calls == [["alone"]]


async def test_a_broken_engine_fails_every_request_of_the_batch(runner: EngineRunner) -> None:
    engine = GateEngine(hold=True, broken=True)
    batcher = MicroBatcher(runner, lambda: engine, BatchPolicy(window_s=0))
    first = asyncio.ensure_future(batcher.embed(["x"], Timing(0.0)))
    await wait_entered(engine)
    later = [asyncio.ensure_future(batcher.embed([t], Timing(0.0))) for t in ("y", "z")]
    await until_open(batcher, 2)
    engine.release.set()
    got = await asyncio.wait_for(asyncio.gather(first, *later, return_exceptions=True), HANG_S)
    assert [type(g) for g in got] == [RuntimeError] * 3


async def test_a_client_that_left_is_not_embedded(runner: EngineRunner) -> None:
    engine = GateEngine(hold=True)
    batcher = MicroBatcher(runner, lambda: engine, BatchPolicy(window_s=0))
    first = asyncio.ensure_future(batcher.embed(["busy"], Timing(0.0)))
    await wait_entered(engine)
    gone = asyncio.ensure_future(batcher.embed(["gone"], Timing(0.0)))
    stays = asyncio.ensure_future(batcher.embed(["stays"], Timing(0.0)))
    await until_open(batcher, 2)
    gone.cancel()
    engine.release.set()
    await asyncio.wait_for(asyncio.gather(first, stays), HANG_S)
    assert engine.calls == [["busy"], ["stays"]]


async def test_a_closing_replica_answers_waiting_requests_with_unavailable(runner: EngineRunner) -> None:
    engine = GateEngine(hold=True)
    batcher = MicroBatcher(runner, lambda: engine, BatchPolicy(window_s=0))
    first = asyncio.ensure_future(batcher.embed(["busy"], Timing(0.0)))
    await wait_entered(engine)
    waiting = asyncio.ensure_future(batcher.embed(["queued"], Timing(0.0)))
    await until_open(batcher, 1)
    runner.closing = True
    engine.release.set()
    await asyncio.wait_for(first, HANG_S)
    with pytest.raises(UnavailableError, match="shutting down"):
        await asyncio.wait_for(waiting, HANG_S)


# -- the endpoint, in process ----------------------------------------------------------------------------


@pytest.fixture
def held() -> GateEngine:
    return GateEngine(hold=True)


@pytest.fixture
def worker(runner: EngineRunner, held: GateEngine) -> WorkerApp:
    return WorkerApp(Replica("gate", "v1", runner, held, held.info()), BatchPolicy(window_s=0))


async def post_all(
    worker: WorkerApp, held: GateEngine, bodies: list[dict[str, object]]
) -> list[httpx.Response]:
    """Occupy the engine with one request, send ``bodies`` at once while it is busy, then let it go on."""
    transport = httpx.ASGITransport(app=worker.starlette(on_startup=lambda: None))
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        first = asyncio.ensure_future(client.post("/v1/embeddings", json={"model": "gate", "input": "busy"}))
        await wait_entered(held)
        sent = [asyncio.ensure_future(client.post("/v1/embeddings", json=b)) for b in bodies]
        with anyio.fail_after(HANG_S):  # a guard against hanging, not a timing assertion
            while worker.batcher.open_requests + sum(f.done() for f in sent) < len(bodies):
                await asyncio.sleep(0)
        held.release.set()
        replies = await asyncio.wait_for(asyncio.gather(first, *sent), HANG_S)
    assert replies[0].status_code == 200
    return replies[1:]


async def test_a_bad_request_does_not_fail_its_batch_mates(worker: WorkerApp, held: GateEngine) -> None:
    replies = await post_all(
        worker,
        held,
        [
            {"model": "gate", "input": ["a b", "c"]},
            {"model": "gate", "input": []},
            {"model": "gate", "input": "d e f", "encoding_format": "base64"},
            {"model": "gate", "input": "x", "dimensions": 2},
        ],
    )
    assert [r.status_code for r in replies] == [200, 400, 200, 400]
    assert held.calls == [["busy"], ["a b", "c", "d e f"]]
    one, two = replies[0].json(), replies[2].json()
    assert [d["embedding"] for d in one["data"]] == [vector("a b"), vector("c")]
    assert [d["index"] for d in one["data"]] == [0, 1]
    decoded = np.frombuffer(base64.b64decode(two["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vector("d e f"), atol=1e-6)
    assert one["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert two["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    for body in (one, two):
        assert body["lamina"]["batch_requests"] == 2 and body["lamina"]["batch_texts"] == 3
        assert body["lamina"]["model_version"] == "v1"
    assert one["lamina"]["start_ns"] == two["lamina"]["start_ns"]
    assert replies[1].json()["error"]["param"] == "input"
    assert replies[3].json()["error"]["param"] == "dimensions"


async def test_a_text_that_breaks_the_engine_fails_only_its_request(
    worker: WorkerApp, held: GateEngine
) -> None:
    replies = await post_all(
        worker, held, [{"model": "gate", "input": "fine"}, {"model": "gate", "input": ["ok", "boom"]}]
    )
    assert [r.status_code for r in replies] == [200, 500]
    assert held.calls == [["busy"], ["fine", "ok", "boom"], ["fine"], ["ok", "boom"]]
    assert replies[0].json()["data"][0]["embedding"] == vector("fine")
    assert replies[0].json()["lamina"]["batch_requests"] == 1  # run again alone
    error = replies[1].json()["error"]
    assert error["code"] == "engine_error" and "cannot embed 'boom'" in error["message"]
