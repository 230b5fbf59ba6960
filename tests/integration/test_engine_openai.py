"""The ``openai`` engine: a remote OpenAI-compatible API served as a deployment, tested against a real
upstream process (``tests/support/openai_upstream.py``) through real replica workers and a real stack."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from typer.testing import CliRunner

from lamina.cli import app
from lamina.config import LaminaConfig
from lamina.errors import ConfigError
from lamina.models import engine_descriptor
from lamina.models._deploy import check_deployment
from tests.support import RunningStack, free_port, start_stack, stop_stack
from tests.support.openai_upstream import (
    RETRY_AFTER_S,
    RunningUpstream,
    RunningWorker,
    start_upstream,
    start_worker,
    stop,
)

pytestmark = pytest.mark.slow

KEY_VAR = "LAMINA_TEST_UPSTREAM_KEY"
KEY = "sk-test-upstream"
#: the main worker's limits: the concurrency test sends more than MAX_CONCURRENCY requests at once
MAX_CONCURRENCY = 4
TIMEOUT_S = 1.0


def options(upstream: RunningUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "base_url": upstream.base_url,
        "model": "up-model",
        "api_key_env": KEY_VAR,
        "timeout_s": TIMEOUT_S,
        "max_concurrency": MAX_CONCURRENCY,
        "headers": {"X-Tenant": "lamina-tests"},
        **extra,
    }


def spec(upstream: RunningUpstream, name: str = "remote") -> dict[str, Any]:
    return {"served_name": name, "engine": "openai", "options": options(upstream)}


class Remote:
    """The module's processes: the upstream, a worker with the right key and one with a wrong key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen[bytes]] = []
        self.upstream = start_upstream(free_port(), KEY, directory / "upstream.log")
        self.procs.append(self.upstream.proc)
        self.worker = self.start(spec(self.upstream), {KEY_VAR: KEY}, "worker")
        self.bad_key = self.start(spec(self.upstream), {KEY_VAR: "sk-wrong"}, "bad-key")

    def start(self, spec: dict[str, Any], env: dict[str, str], name: str, wait: bool = True) -> RunningWorker:
        clean = {k: v for k, v in os.environ.items() if k != KEY_VAR}
        log = self.directory / f"{name}.log"
        worker = start_worker(spec, free_port(), log, {**clean, **env}, wait_s=60 if wait else None)
        self.procs.append(worker.proc)
        return worker

    def seen(self) -> dict[str, Any]:
        """What the upstream saw last."""
        return dict(self.upstream.stats()["seen"][-1])


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        r = Remote(tmp_path_factory.mktemp("openai-engine"))
        procs = r.procs
        yield r
    finally:
        stop(procs)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "remote", "messages": [{"role": "user", "content": content}], **extra}


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def post(worker: RunningWorker, path: str, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{worker.url}/v1/{path}", json=body, timeout=timeout)


def events(response: httpx.Response) -> list[Any]:
    """The JSON payloads of an SSE body, ``[DONE]`` as the string."""
    text = response.text
    assert text.endswith("\n\n"), text
    out: list[Any] = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: "), event
        payload = event.removeprefix("data: ")
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_chat_is_forwarded_with_the_upstream_model_and_key(remote: Remote) -> None:
    with client_of(remote.worker.url) as client:
        reply = client.chat.completions.create(
            model="remote", messages=[{"role": "user", "content": "hi there"}]
        )
    assert reply.choices[0].message.content == "echo: hi there"
    assert reply.model == "remote"
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 2)
    seen = remote.seen()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["body"] == {"model": "up-model", "messages": [{"role": "user", "content": "hi there"}]}
    assert seen["headers"]["authorization"] == f"Bearer {KEY}"
    assert seen["headers"]["x-tenant"] == "lamina-tests"


def test_answers_carry_the_lamina_extension(remote: Remote) -> None:
    r = post(remote.worker, "chat/completions", chat("timing"))
    assert r.status_code == 200, r.text
    lamina = r.json()["lamina"]
    assert {"queue_ms", "engine_ms", "compute_ms", "ttft_ms", "start_ns", "end_ns"} <= set(lamina)
    assert lamina["upstream_usage"] is True and lamina["upstream_model"] == "up-model"
    assert lamina["engine_ms"] > 0 and lamina["end_ns"] >= lamina["start_ns"] > 0


def test_a_stream_is_relayed_and_ends_with_the_usage_chunk(remote: Remote) -> None:
    r = post(remote.worker, "chat/completions", chat("stream me", stream=True))
    assert r.status_code == 200, r.text
    *chunks, usage, done = events(r)
    assert done == "[DONE]"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "echo: hi"
    assert all(c["model"] == "remote" for c in chunks)
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 3,
        "total_tokens": 7,
    }
    assert usage["lamina"]["upstream_usage"] is True and usage["lamina"]["ttft_ms"] > 0
    # the client did not ask for usage; the upstream was asked anyway, so that the replica can count it
    assert remote.seen()["body"]["stream_options"] == {"include_usage": True}


def test_a_stream_without_upstream_usage_counts_nothing_and_says_so(remote: Remote) -> None:
    r = post(remote.worker, "chat/completions", chat("!nousage", stream=True))
    assert r.status_code == 200, r.text
    *_, usage, done = events(r)
    assert done == "[DONE]" and usage["choices"] == []
    assert usage["usage"] is None and usage["lamina"]["upstream_usage"] is False


def test_completions_plain_and_streamed(remote: Remote) -> None:
    r = post(remote.worker, "completions", {"model": "remote", "prompt": "once upon"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "echo: once upon" and r.json()["model"] == "remote"
    r = post(remote.worker, "completions", {"model": "remote", "prompt": "once", "stream": True})
    *chunks, usage, done = events(r)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "echo: hi"
    assert usage["usage"]["completion_tokens"] == 3 and done == "[DONE]"


def test_embeddings(remote: Remote) -> None:
    with client_of(remote.worker.url) as client:
        out = client.embeddings.create(model="remote", input=["one two", "three"])
    assert [d.embedding for d in out.data] == [[7.0, 1.0, 0.0, 0.5], [5.0, 1.0, 0.0, 0.5]]
    assert out.usage.prompt_tokens == 3
    assert remote.seen()["body"] == {
        "model": "up-model",
        "input": ["one two", "three"],
        "encoding_format": "base64",
    }


def test_tools_response_format_and_unknown_fields_go_upstream_as_sent(remote: Remote) -> None:
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
    fields = {
        "tools": [tool],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 2,
        "user": "u-17",
        "some_new_field": {"nested": [1, 2]},
    }
    r = post(remote.worker, "chat/completions", chat("weather?", **fields))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert remote.seen()["body"] == {**chat("weather?", **fields), "model": "up-model"}


def test_requests_overlap_at_the_upstream_up_to_max_concurrency(remote: Remote) -> None:
    remote.upstream.reset()
    n, sleep_s = 2 * MAX_CONCURRENCY, 0.4
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as pool:
        replies = list(
            pool.map(
                lambda i: post(remote.worker, "chat/completions", chat(f"!sleep {sleep_s} #{i}")), range(n)
            )
        )
    elapsed = time.perf_counter() - started
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    stats = remote.upstream.stats()
    # all slots were busy together, and never more: the rest waited in the replica (as queue time)
    assert stats["max_in_flight"] == MAX_CONCURRENCY
    assert elapsed < n * sleep_s / 2, f"{n} requests of {sleep_s} s took {elapsed:.2f} s"
    queued = sorted(r.json()["lamina"]["queue_ms"] for r in replies)
    assert queued[-1] >= sleep_s * 1000 * 0.5, queued
    print(
        f"\n{n} requests of {sleep_s} s, max_concurrency {MAX_CONCURRENCY}: {elapsed:.2f} s, "
        f"queue_ms {queued}"
    )


def test_a_rejected_key_is_a_502_naming_the_variable(remote: Remote) -> None:
    r = post(remote.bad_key, "chat/completions", chat("hello"))
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "upstream_error" and error["details"] == {"upstream_status": 401}
    assert f"rejected the API key in ${KEY_VAR}" in error["message"]
    assert "Incorrect API key provided" in error["message"]


def test_upstream_rate_limits_are_429_with_retry_after(remote: Remote) -> None:
    r = post(remote.worker, "chat/completions", chat("!status 429"))
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == RETRY_AFTER_S
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert "upstream says 429" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("status", "answered", "code"),
    [(500, 502, "upstream_error"), (400, 400, "invalid_request"), (404, 502, "upstream_error")],
)
def test_upstream_errors_keep_their_status_and_message(
    remote: Remote, status: int, answered: int, code: str
) -> None:
    r = post(remote.worker, "chat/completions", chat(f"!status {status}"))
    assert r.status_code == answered, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["details"] == {"upstream_status": status}
    assert f"HTTP {status}: upstream says {status}" in error["message"]


def test_an_error_before_the_first_chunk_is_an_http_error_not_a_stream(remote: Remote) -> None:
    r = post(remote.worker, "chat/completions", chat("!status 503", stream=True))
    assert r.status_code == 502 and r.headers["content-type"].startswith("application/json"), r.text
    assert "HTTP 503" in r.json()["error"]["message"]


def test_an_upstream_error_mid_stream_ends_the_stream_with_an_error_event(remote: Remote) -> None:
    r = post(remote.worker, "chat/completions", chat("!midfail", stream=True))
    assert r.status_code == 200, r.text
    first, second, error, done = events(r)
    assert [c["choices"][0]["delta"]["content"] for c in (first, second)] == ["echo", ":"]
    assert error["error"]["code"] == "upstream_error" and "the model fell over" in error["error"]["message"]
    assert done == "[DONE]"


def test_a_slow_upstream_is_a_504_after_timeout_s(remote: Remote) -> None:
    started = time.perf_counter()
    r = post(remote.worker, "chat/completions", chat("!sleep 3"))
    elapsed = time.perf_counter() - started
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "upstream_timeout" and "timeout_s=1" in r.json()["error"]["message"]
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.5


def _abandoned_soon(remote: Remote, before: int) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = int(remote.upstream.stats()["abandoned"])
        if now > before:
            return now
        time.sleep(0.02)
    return before


def test_a_client_leaving_cancels_the_upstream_request(remote: Remote) -> None:
    before = int(remote.upstream.stats()["abandoned"])
    with pytest.raises(httpx.ReadTimeout):
        post(remote.worker, "chat/completions", chat("!sleep 0.9"), timeout=0.3)
    assert _abandoned_soon(remote, before) == before + 1


def test_a_client_leaving_a_stream_cancels_the_upstream_stream(remote: Remote) -> None:
    before = int(remote.upstream.stats()["abandoned"])
    body = chat("!trickle", stream=True)
    with httpx.stream("POST", f"{remote.worker.url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # 100 tokens 50 ms apart would take 5 s; the upstream hears of the client leaving at once
    started = time.monotonic()
    assert _abandoned_soon(remote, before) == before + 1
    assert time.monotonic() - started < 2


def test_a_missing_key_variable_stops_the_replica_naming_it(remote: Remote) -> None:
    worker = remote.start(spec(remote.upstream), {}, "no-key", wait=False)
    assert worker.proc.wait(timeout=60) == 1
    log = worker.log()
    assert f"`api_key_env` names ${KEY_VAR}, which is not set" in log and f"export {KEY_VAR}=" in log


def test_options_are_strict_and_keys_stay_out_of_the_config() -> None:
    descriptor = engine_descriptor("openai")
    assert not descriptor.needs_model
    with pytest.raises(ConfigError, match=r"`api_key`: Extra inputs are not permitted"):
        descriptor.parse_options({"base_url": "http://x/v1", "model": "m", "api_key": "sk-1"}, "test")
    with pytest.raises(ConfigError, match=r"`api_key_env`: String should match pattern"):
        descriptor.parse_options({"base_url": "http://x/v1", "model": "m", "api_key_env": "sk-123 4"}, "test")
    with pytest.raises(ConfigError, match=r"Authorization are set by Lamina"):
        descriptor.parse_options(
            {"base_url": "http://x/v1", "model": "m", "headers": {"Authorization": "k"}}, "t"
        )
    parsed = descriptor.validate_options({"base_url": "http://x/v1/", "model": "m"}, "test")
    assert parsed["base_url"] == "http://x/v1" and parsed["api_key_env"] is None


def test_lamina_engines_lists_it_with_its_options() -> None:
    listed = CliRunner().invoke(app, ["engines", "--json"])
    assert listed.exit_code == 0, listed.output
    engine = {e["name"]: e for e in json.loads(listed.output)}["openai"]
    assert engine["formats"] == []
    assert {"chat", "completion", "embedding", "streaming", "passthrough"} <= set(engine["capabilities"])
    assert set(engine["options"]) == {
        "base_url",
        "model",
        "api_key_env",
        "timeout_s",
        "max_concurrency",
        "headers",
    }
    assert engine["options"]["max_concurrency"]["default"] == 64


STACK_CONFIG = """
register_bundled: false
deployments:
  - name: gpt-remote
    engine: openai
    openai:
      base_url: {base_url}
      model: up-model
      api_key_env: {key_var}
"""


@pytest.fixture(scope="module")
def stack(remote: Remote, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    os.environ[KEY_VAR] = KEY  # `lamina up` passes its environment on to the replicas
    try:
        config = STACK_CONFIG.format(base_url=remote.upstream.base_url, key_var=KEY_VAR)
        running = start_stack(tmp_path_factory.mktemp("stack"), config, timeout_s=120)
    finally:
        del os.environ[KEY_VAR]
    yield running
    assert stop_stack(running) == []


def test_a_lamina_up_stack_serves_the_remote_deployment(stack: RunningStack, remote: Remote) -> None:
    with client_of(stack.base_url) as client:
        _ask_the_stack(client)
    assert remote.seen()["body"]["model"] == "up-model"


def test_upstream_errors_reach_the_client_through_the_gateway(stack: RunningStack) -> None:
    def ask(content: str) -> httpx.Response:
        body = {"model": "gpt-remote", "messages": [{"role": "user", "content": content}]}
        return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=30)

    limited = ask("!status 429")
    assert limited.status_code == 429 and "upstream says 429" in limited.json()["error"]["message"]
    assert limited.headers["retry-after"] == RETRY_AFTER_S  # kept by the replica and by the gateway
    failed = ask("!status 500")
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "upstream_error"


def test_the_readme_example_is_a_valid_config() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("### Remote upstreams", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    config = LaminaConfig.model_validate({"register_bundled": False, **yaml.safe_load(block)})
    checked = [check_deployment(d).options_for("openai") for d in config.deployments]
    assert [c["api_key_env"] for c in checked] == ["OPENAI_API_KEY", None]


def _ask_the_stack(client: openai.OpenAI) -> None:
    assert "gpt-remote" in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(
        model="gpt-remote", messages=[{"role": "user", "content": "via stack"}]
    )
    assert reply.choices[0].message.content == "echo: via stack" and reply.model == "gpt-remote"
    stream = client.chat.completions.create(
        model="gpt-remote",
        messages=[{"role": "user", "content": "streamed"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hi"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
