"""Rate limits: which limits apply, the windows and headers (pure, table-driven, fake clock), and the
policy in a gateway on the fakes: rpm and tpm per key, per model and in all, refusals with OpenAI's
headers, token settlement, a refusal taking nothing from the other limits, Redis down."""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from lamina.application import ANONYMOUS, Call, Principal, RateLimitPolicy, Usage
from lamina.application._ratelimit import Count, Limit, Window, headers_for, limits_for, reset_text
from lamina.config import LaminaConfig, ModelRateLimitsConfig, RateLimitsConfig
from lamina.errors import ConfigError, NoReadyReplicaError
from tests.support import CHAT, EMBED, FakeClock, ReplayDispatcher
from tests.support.processes import free_port
from tests.support.ratelimit_gateway import principal, rate_limited_app

#: Python-level calls per admitted and settled call (measured on 1 December 2026: 247 with five limits, 13
#: with none), with room for library upgrades
LIMITED_CALLS = 400
NO_LIMIT_CALLS = 25

pytestmark = pytest.mark.anyio

ALICE, BOB = principal("alice", rpm=2), principal("bob")
PRINCIPALS = {"alice": ALICE, "bob": BOB}


# --- pure parts ----------------------------------------------------------------------------------------


def _names(limits: list[Limit]) -> list[tuple[str, str, str, int]]:
    return [(lim.scope, lim.subject, lim.unit, lim.value) for lim in limits]


LIMITS = RateLimitsConfig(
    key_rpm=5,
    key_tpm=500,
    rpm=100,
    per_model={CHAT: ModelRateLimitsConfig(tpm=900), "docs-bot": ModelRateLimitsConfig(rpm=3)},
)


@pytest.mark.parametrize(
    ("who", "model", "deployment", "expected"),
    [
        # a key with its own rpm keeps the default tpm; the model by its deployment; then global
        (
            ALICE,
            f"{CHAT}@1",
            CHAT,
            [
                ("key", "key_alice", "rpm", 2),
                ("key", "key_alice", "tpm", 500),
                ("model", CHAT, "tpm", 900),
                ("global", "*", "rpm", 100),
            ],
        ),
        # a RAG alias and the deployment it writes with both count
        (
            BOB,
            "docs-bot",
            CHAT,
            [
                ("key", "key_bob", "rpm", 5),
                ("key", "key_bob", "tpm", 500),
                ("model", "docs-bot", "rpm", 3),
                ("model", CHAT, "tpm", 900),
                ("global", "*", "rpm", 100),
            ],
        ),
        # no key (a local gateway without keys): no per-key limit
        (ANONYMOUS, EMBED, EMBED, [("global", "*", "rpm", 100)]),
    ],
)
def test_limits_that_apply(who: Principal, model: str, deployment: str, expected: list[Any]) -> None:
    assert _names(limits_for(who, model, deployment, LIMITS)) == expected


def test_nothing_applies_without_limits() -> None:
    assert limits_for(BOB, CHAT, CHAT, RateLimitsConfig()) == []


@pytest.mark.parametrize(
    ("now", "number", "resets_in"),
    [(0.0, 0, 60.0), (59.5, 0, 0.5), (60.0, 1, 60.0), (1735689621.25, 28928160, 38.75)],
)
def test_windows_are_clock_minutes(now: float, number: int, resets_in: float) -> None:
    window = Window.at(now)
    assert window.number == number
    assert window.resets_in == pytest.approx(resets_in)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.25, "250ms"), (0.0001, "1ms"), (1.0, "1s"), (12.5, "12.5s"), (60.0, "1m0s")]
)
def test_reset_is_written_like_openai(seconds: float, text: str) -> None:
    assert reset_text(seconds) == text


def test_headers_name_the_tightest_limit_of_each_unit() -> None:
    key = Limit("key", "k", "rpm", 10, "the key")
    glob = Limit("global", "*", "rpm", 100, "the gateway")
    tokens = Limit("model", "m", "tpm", 1000, "the model")
    counts = [Count(key, 1, 9), Count(glob, 1, 95), Count(tokens, 300, 300)]
    assert headers_for(counts, Window(0, 30.0)) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "700",
        "x-ratelimit-reset-tokens": "30s",
    }


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"storage_url": "mem://"}, "storage_url"),
        ({"storage_url": "memory://x"}, "storage_url"),
        ({"key_rpm": 0}, "key_rpm"),
        ({"per_model": {CHAT: {"tpm": -1}}}, "tpm"),
        ({"rpm_limit": 5}, "rpm_limit"),
    ],
)
def test_the_config_section_refuses_what_cannot_work(section: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        LaminaConfig.model_validate({"rate_limits": section})


def test_the_config_section_takes_redis_urls() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://:secret@cache.internal:6380/2"):
        assert (
            LaminaConfig.model_validate({"rate_limits": {"storage_url": url}}).rate_limits.storage_url == url
        )


def test_per_model_limits_must_name_served_models() -> None:
    config = RateLimitsConfig(per_model={"gpt-17": ModelRateLimitsConfig(rpm=1)})
    with pytest.raises(ConfigError, match=r"gpt-17.*chat-model"):
        RateLimitPolicy(config, known_models=[CHAT])


# --- in a gateway --------------------------------------------------------------------------------------


@dataclass
class Limited:
    client: httpx.AsyncClient
    policy: RateLimitPolicy
    clock: FakeClock
    dispatcher: ReplayDispatcher

    async def chat(self, key: str = "alice", model: str = CHAT, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return await self.client.post(
            "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        )

    async def counter(self, scope: str, subject: str, unit: str) -> int:
        window = Window.at(self.clock.monotonic()).number
        return await self.policy.counters.value(f"{scope}/{subject}/{unit}/{window}")


def limits(**config: Any) -> pytest.MarkDecorator:
    """The rate limits of the test's ``limited`` gateway (a RateLimitsConfig's fields)."""
    return pytest.mark.parametrize("limited", [config], indirect=True, ids=["limits"])


@pytest.fixture
async def limited(request: pytest.FixtureRequest) -> AsyncIterator[Limited]:
    """A gateway on the fakes with the keys alice (rpm 2) and bob, and the limits given by ``limits``."""
    config = RateLimitsConfig(**getattr(request, "param", {}))
    clock = FakeClock()
    policy = RateLimitPolicy(config, clock=clock.monotonic)
    app, dispatcher, telemetry = rate_limited_app(policy, PRINCIPALS)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
        yield Limited(client, policy, clock, dispatcher)
    await policy.aclose()
    telemetry.shutdown()


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert isinstance(body.get("error"), dict), body
    return dict(body["error"])


async def test_a_keys_rpm_refuses_with_retry_after_and_openai_headers(limited: Limited) -> None:
    limited.clock.advance(15)  # 45 s left in the minute
    first, second, third = [await limited.chat() for _ in range(3)]
    assert (first.status_code, second.status_code) == (200, 200), second.text
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert first.headers["x-ratelimit-reset-requests"] == "45s"
    assert "x-ratelimit-limit-tokens" not in first.headers  # no tpm applies to alice
    assert third.status_code == 429
    assert third.headers["retry-after"] == "45"
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    error = error_of(third)
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    assert "the key 'alice' (key_alice) allows 2 requests per minute (key rpm)" in error["message"]
    assert "retry after 45 s" in error["message"]
    assert len(limited.dispatcher.sent) == 2
    # another key has its own counter; the next minute starts from zero
    assert (await limited.chat("bob")).status_code == 200
    limited.clock.advance(45)
    assert (await limited.chat()).status_code == 200


@limits(key_rpm=1)
async def test_the_default_key_limit_applies_to_keys_without_their_own(limited: Limited) -> None:
    assert [(await limited.chat("bob")).status_code for _ in range(2)] == [200, 429]
    assert "the key 'bob' (key_bob) allows 1 requests" in error_of(await limited.chat("bob"))["message"]
    assert (await limited.chat("alice")).status_code == 200  # alice's own rpm (2) wins over the default


@limits(per_model={CHAT: ModelRateLimitsConfig(rpm=2)})
async def test_a_models_rpm_counts_every_key_and_its_versioned_name(limited: Limited) -> None:
    assert (await limited.chat("bob")).status_code == 200
    assert (await limited.chat("bob", model=f"{CHAT}@1")).status_code == 200
    refused = await limited.chat("bob")
    assert refused.status_code == 429
    assert "the model 'chat-model' allows 2 requests per minute (model rpm)" in error_of(refused)["message"]
    r = await limited.client.post(
        "/v1/embeddings", json={"model": EMBED, "input": "x"}, headers={"authorization": "Bearer bob"}
    )
    assert r.status_code == 200, r.text


@limits(rpm=3)
async def test_the_global_rpm_counts_all_keys(limited: Limited) -> None:
    codes = [(await limited.chat(key)).status_code for key in ("bob", "alice", "bob", "alice")]
    assert codes == [200, 200, 200, 429]
    assert (
        "the gateway allows 3 requests per minute (global rpm)" in error_of(await limited.chat())["message"]
    )


@limits(key_tpm=2000)
async def test_tokens_are_reserved_then_settled_with_the_actual_usage(limited: Limited) -> None:
    # each call reserves its prompt estimate + max_tokens (~610) and uses 11 (the fake replica's usage):
    # without settlement the fourth would not fit
    for n in range(1, 6):
        r = await limited.chat("bob", max_tokens=600)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-remaining-tokens"] == str(2000 - 11 * n)  # after settlement
    assert await limited.counter("key", "key_bob", "tpm") == 55


@limits(key_tpm=2000)
async def test_a_stream_settles_its_tokens_from_its_usage_chunk(limited: Limited) -> None:
    r = await limited.chat("bob", max_tokens=600, stream=True)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert int(r.headers["x-ratelimit-remaining-tokens"]) < 2000 - 600  # sent with the reservation held
    assert await limited.counter("key", "key_bob", "tpm") == 11


@limits(key_rpm=10, key_tpm=2000)
async def test_a_failed_call_gives_back_all_its_tokens_but_counts_as_a_request(limited: Limited) -> None:
    limited.dispatcher.error = NoReadyReplicaError("no replica of chat-model is ready; wait")
    assert (await limited.chat("bob", max_tokens=600)).status_code == 503
    assert await limited.counter("key", "key_bob", "tpm") == 0
    assert await limited.counter("key", "key_bob", "rpm") == 1


@limits(key_rpm=10, key_tpm=1000, rpm=10, tpm=100)
async def test_a_refusal_by_one_limit_takes_nothing_from_the_others(limited: Limited) -> None:
    assert (await limited.chat("bob", max_tokens=20)).status_code == 200  # uses 11 of the global 100
    refused = await limited.chat("bob", max_tokens=75)  # reserves 94: fits 100 alone, not the 89 left
    assert refused.status_code == 429
    message = error_of(refused)["message"]
    assert "the gateway allows 100 tokens per minute (global tpm)" in message
    assert "11 are taken in this minute" in message
    assert refused.headers["x-ratelimit-limit-tokens"] == "100"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "89"
    assert refused.headers["x-ratelimit-remaining-requests"] == "9"  # the tightest rpm, as if not sent
    expected = {("key", "rpm"): 1, ("key", "tpm"): 11, ("global", "rpm"): 1, ("global", "tpm"): 11}
    subjects = {"key": "key_bob", "global": "*"}
    assert {k: await limited.counter(k[0], subjects[k[0]], k[1]) for k in expected} == expected


@limits(key_tpm=100)
async def test_a_call_that_can_never_fit_is_a_413_naming_max_tokens(limited: Limited) -> None:
    r = await limited.chat("bob", max_tokens=500)
    assert r.status_code == 413
    error = error_of(r)
    assert error["param"] == "max_tokens" and "lower max_tokens" in error["message"]
    assert await limited.counter("key", "key_bob", "tpm") == 0


async def _with_redis_down(fail_open: bool) -> httpx.Response:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    policy = RateLimitPolicy(RateLimitsConfig(storage_url=url, rpm=5, fail_open=fail_open))
    app, _, telemetry = rate_limited_app(policy, PRINCIPALS)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as c:
            body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
            return await c.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer bob"})
    finally:
        await policy.aclose()
        telemetry.shutdown()


async def test_redis_down_fails_closed_with_a_503_naming_it() -> None:
    r = await _with_redis_down(fail_open=False)
    assert r.status_code == 503
    error = error_of(r)
    assert error["code"] == "unavailable"
    assert "the rate-limit store redis://127.0.0.1:" in error["message"]
    assert "unreachable" in error["message"] and "rate_limits.fail_open" in error["message"]


async def test_redis_down_fails_open_when_configured() -> None:
    r = await _with_redis_down(fail_open=True)
    assert r.status_code == 200, r.text
    assert "x-ratelimit-limit-requests" not in r.headers


async def test_admission_work_stays_small() -> None:
    """The work per admitted and settled call, in process: with five limits (key rpm and tpm, a model's
    tpm, global rpm and tpm), and with none applying (the policy is always on). Counted as Python-level
    calls, which do not depend on the machine's speed (bench/gateway_overhead.py has the CPU time): a
    change that, say, compiled a statement on every call would multiply them."""
    huge = 10**12
    config = RateLimitsConfig(
        key_rpm=huge, key_tpm=huge, rpm=huge, tpm=huge, per_model={CHAT: ModelRateLimitsConfig(tpm=huge)}
    )
    usage = Usage(prompt_tokens=9, completion_tokens=2)
    work: dict[str, float] = {}
    calls = 200
    for name, policy in (("limited", RateLimitPolicy(config)), ("none", RateLimitPolicy(RateLimitsConfig()))):
        profile = cProfile.Profile()
        for n in range(calls + 1):
            if n == 1:  # the first call sets up the policy's counters
                profile.enable()
            call = Call(BOB, "chat", CHAT, CHAT, None, {}, False, prompt_tokens=12, completion_tokens=100)
            ticket = await policy.admit(call)
            if ticket is not None:
                await ticket.settle(call, usage)
        profile.disable()
        stats: dict[Any, tuple[int, ...]] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
        work[name] = sum(entry[1] for entry in stats.values()) / calls
        if name == "limited":
            window = Window.at(time.time()).number
            count = await policy.counters.value(f"global/*/tpm/{window}")
            assert count in (11 * (calls + 1), 0)  # 0: the minute ended
            assert call.headers["x-ratelimit-limit-tokens"] == str(huge)
        await policy.aclose()
    print(f"rate-limit work per call: {work['limited']:.0f} calls (5 limits), {work['none']:.0f} (none)")
    assert work["limited"] < LIMITED_CALLS
    assert work["none"] < NO_LIMIT_CALLS
