"""Rate limits shared through a real redis-server by two real gateway processes: under a limit of N,
exactly N of M concurrent requests (split across both) are admitted, for requests and for tokens, and
the tokens are settled across processes to what the calls used."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lamina.application import RateLimitPolicy
from lamina.application._policy import estimate_prompt_tokens
from lamina.config import (
    DeploymentConfig,
    LaminaConfig,
    ModelRateLimitsConfig,
    OrchestrationConfig,
    RateLimitsConfig,
)
from lamina.errors import ConfigError
from lamina.stack._gateway_parts import gateway_policies
from lamina.stack.gateway import build_stack, create_gateway
from tests.support import CHAT
from tests.support.processes import free_port
from tests.support.redis_server import RedisServer, running_redis

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[2]
N, M = 10, 40
MESSAGES = [{"role": "user", "content": "hi"}]
MAX_TOKENS = 100
#: what each call reserves: its prompt estimate plus max_tokens
RESERVED = estimate_prompt_tokens({"messages": MESSAGES}) + MAX_TOKENS
#: the fake replica's usage of a plain chat answer (tests/support/gateway.py)
USED = 11
#: seconds the fake replica takes: every call is admitted or refused before the first one settles
DELAY_S = 3.0
KEYS = {"requests": {"rpm": N}, "tokens": {"tpm": N * RESERVED}}


@dataclass
class Shared:
    redis: RedisServer
    urls: list[str]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One redis-server and two gateway processes counting in it."""
    tmp = tmp_path_factory.mktemp("ratelimit")
    with running_redis(tmp / "redis") as server:
        limits = json.dumps({"storage_url": server.url})
        procs: list[subprocess.Popen[bytes]] = []
        urls = []
        try:
            for i in range(2):
                port = free_port()
                cmd = [sys.executable, "-m", "tests.support.ratelimit_gateway", "--port", str(port)]
                cmd += ["--limits", limits, "--keys", json.dumps(KEYS), "--delay", str(DELAY_S)]
                with (tmp / f"gateway-{i}.log").open("wb") as log:
                    procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
                urls.append(f"http://127.0.0.1:{port}")
            for i, (proc, url) in enumerate(zip(procs, urls, strict=True)):
                _wait_healthy(proc, url, tmp / f"gateway-{i}.log")
            yield Shared(server, urls)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the gateway exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"the gateway at {url} did not answer /healthz in {timeout_s} s")


def _this_window(room_s: float) -> int:
    """The current minute's window number, after waiting for the next minute if fewer than ``room_s``
    seconds are left in this one (so a burst is counted in one window)."""
    now = time.time()
    if 60 - now % 60 < room_s:
        time.sleep(60 - now % 60 + 0.05)
        now = time.time()
    return int(now // 60)


async def _burst(urls: list[str], key: str) -> list[httpx.Response]:
    """M concurrent chat calls with ``key``, alternating between the gateways."""
    body = {"model": CHAT, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=M)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        calls = [
            client.post(f"{urls[i % 2]}/v1/chat/completions", json=body, headers=headers) for i in range(M)
        ]
        return list(await asyncio.gather(*calls))


def _counter(shared: Shared, key: str, unit: str, window: int) -> int:
    with shared.redis.client() as client:
        return int(client.get(f"lamina:ratelimit:key/key_{key}/{unit}/{window}") or 0)


async def test_two_gateways_admit_exactly_n_requests_per_minute(shared: Shared) -> None:
    window = _this_window(room_s=5)
    responses = await _burst(shared.urls, "requests")
    codes = [r.status_code for r in responses]
    assert (codes.count(200), codes.count(429)) == (N, M - N), codes
    # each gateway got M / 2 > N calls: counted per process, each would have admitted N
    refused = next(r for r in responses if r.status_code == 429)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == str(N)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert f"allows {N} requests per minute (key rpm)" in refused.json()["error"]["message"]
    assert _counter(shared, "requests", "rpm", window) == N


async def test_two_gateways_admit_exactly_n_token_reservations_and_settle_them(shared: Shared) -> None:
    window = _this_window(room_s=5 + DELAY_S)
    responses = await _burst(shared.urls, "tokens")
    codes = [r.status_code for r in responses]
    assert (codes.count(200), codes.count(429)) == (N, M - N), codes
    refused = next(r for r in responses if r.status_code == 429)
    assert f"allows {N * RESERVED} tokens per minute (key tpm)" in refused.json()["error"]["message"]
    # every admitted call has settled: the counter holds what they used, not what they reserved
    assert _counter(shared, "tokens", "tpm", window) == N * USED


async def test_the_composition_root_puts_rate_limits_first(tmp_path: Path) -> None:
    """`lamina up`'s gateway (a fake-engine replica process behind it) counts calls against
    ``rate_limits``, and refuses per-model limits for models it does not serve."""
    config = LaminaConfig(
        register_bundled=False,
        deployments=[DeploymentConfig(name="chat", engine="fake", replicas=1)],
        orchestration=OrchestrationConfig(ready_timeout_s=60, health_interval_s=0.2),
        rate_limits=RateLimitsConfig(rpm=1),
    )
    unknown = config.model_copy(
        update={"rate_limits": RateLimitsConfig(per_model={"gpt": ModelRateLimitsConfig(rpm=1)})}
    )
    refused = build_stack(unknown, tmp_path / "unknown")
    try:
        with pytest.raises(ConfigError, match="per_model names models that are not served: gpt"):
            gateway_policies(refused)
    finally:
        await refused.aclose()
    stack = build_stack(config, tmp_path / "state")
    assert isinstance(gateway_policies(stack)[0], RateLimitPolicy)
    app = create_gateway(stack)
    async with app.router.lifespan_context(app):
        assert await stack.controller.wait_ready(60)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            body = {"model": "chat", "messages": MESSAGES}
            first, second = [await client.post("/v1/chat/completions", json=body) for _ in range(2)]
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    assert second.status_code == 429, second.text
    assert "the gateway allows 1 requests per minute" in second.json()["error"]["message"]
