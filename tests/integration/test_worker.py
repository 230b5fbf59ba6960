"""The replica worker as a real process on a free loopback port (the fake engine, and once the real GGUF)."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from lamina.config import DeploymentConfig
from lamina.models import GGUFOptions
from lamina.models._deploy import WorkerSpec, worker_workload
from lamina.models._engine import LoadSpec, load_engine
from lamina.models._worker_app import Replica, WorkerApp, field_path
from lamina.models._worker_stream import EngineRunner
from tests.support import free_port, run_python, smollm2_path

pytestmark = pytest.mark.slow


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 120.0) -> list[httpx.Response]:
        """Poll /health until 200; the answers seen on the way."""
        seen: list[httpx.Response] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                seen.append(httpx.get(f"{self.url}/health", timeout=5))
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            if seen[-1].status_code == 200:
                return seen
            time.sleep(0.01)
        raise AssertionError(f"worker not ready after {timeout_s}s:\n{self.log()}")


Spawn = Callable[..., Worker]


def _spawn_into(directory: Path, procs: list[subprocess.Popen[bytes]]) -> Spawn:
    def spawn(spec: dict[str, Any], name: str = "w", wait: bool = True) -> Worker:
        spec_path = directory / f"{name}.json"
        spec_path.write_text(json.dumps(spec))
        port = free_port()
        log_path = directory / f"{name}.log"
        with log_path.open("wb") as log:
            cmd = [
                sys.executable,
                "-m",
                "lamina.models._worker",
                "--port",
                str(port),
                "--spec",
                str(spec_path),
                "--no-secret",  # these tests talk to the worker directly; the secret has its own tests
            ]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        worker = Worker(proc, f"http://127.0.0.1:{port}", log_path)
        if wait:
            worker.wait_ready()
        return worker

    return spawn


def _kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield _spawn_into(tmp_path, procs)
    finally:
        _kill_all(procs)


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One fake-engine worker for the module: echo, 10 ms per token, a 64-word context."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        options = {"seconds_per_token": 0.01, "n_ctx": 64, "embedding_dim": 8}
        spec = {"served_name": "echo", "engine": "fake", "model_version": "v7", "options": options}
        yield _spawn_into(tmp_path_factory.mktemp("echo"), procs)(spec, name="echo")
    finally:
        _kill_all(procs)


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking its framing on the way."""
    text = response.text
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    return [e.removeprefix("data: ") for e in events]


def test_chat_completion_body(echo: Worker) -> None:
    r = httpx.post(f"{echo.url}/v1/chat/completions", json=chat_body("hello there world"), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "echo"
    message = {"role": "assistant", "content": "hello there world", "refusal": None}
    assert body["choices"][0]["message"] == message
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    lamina = body["lamina"]
    assert set(lamina) == {
        "queue_ms",
        "engine_ms",
        "compute_ms",
        "ttft_ms",
        "start_ns",
        "end_ns",
        "model_version",
    }
    assert lamina["compute_ms"] == lamina["engine_ms"]  # alone in its engine: all of its time
    assert lamina["model_version"] == "v7"
    assert lamina["start_ns"] <= lamina["end_ns"]


def test_chat_stream_format(echo: Worker) -> None:
    r = httpx.post(f"{echo.url}/v1/chat/completions", json=chat_body("one two three four", stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "echo" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *content, usage = chunks
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == "one two three four"
    assert [c["choices"][0]["finish_reason"] for c in content][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert usage["lamina"]["model_version"] == "v7"


def test_completion_stream_and_max_tokens(echo: Worker) -> None:
    body = {"model": "echo", "prompt": "a b c d e", "max_tokens": 2, "stream": True}
    events = sse_events(httpx.post(f"{echo.url}/v1/completions", json=body, timeout=30))
    chunks = [json.loads(e) for e in events[:-1]]
    *content, usage = chunks
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in content) == "a b"
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_concurrent_requests_all_get_answers(echo: Worker) -> None:
    def ask(i: int) -> str:
        body = chat_body(f"request number {i} says hi", stream=i % 2 == 0)
        r = httpx.post(f"{echo.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        if i % 2:
            return str(r.json()["choices"][0]["message"]["content"])
        chunks = [json.loads(e) for e in sse_events(r)[:-1]]
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [f"request number {i} says hi" for i in range(8)]


def test_embeddings_float_and_base64(echo: Worker) -> None:
    texts = ["alpha", "beta gamma"]
    floats = httpx.post(f"{echo.url}/v1/embeddings", json={"model": "echo", "input": texts}).json()
    assert floats["model"] == "echo" and floats["usage"]["prompt_tokens"] == 3
    encoded = httpx.post(
        f"{echo.url}/v1/embeddings", json={"model": "echo", "input": texts, "encoding_format": "base64"}
    ).json()
    for f, b in zip(floats["data"], encoded["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.shape == (8,)
        assert np.allclose(decoded, f["embedding"], atol=1e-6)
    # the official client asks for base64 and decodes it itself
    client = openai.OpenAI(base_url=f"{echo.url}/v1", api_key="unused", max_retries=0)
    reply = client.embeddings.create(model="echo", input=texts)
    assert np.allclose([d.embedding for d in reply.data], [d["embedding"] for d in floats["data"]], atol=1e-6)


def test_other_dimensions_are_unsupported(echo: Worker) -> None:
    r = httpx.post(f"{echo.url}/v1/embeddings", json={"model": "echo", "input": "x", "dimensions": 4})
    assert r.status_code == 400
    assert (
        r.json()["error"]["code"] == "unsupported_capability" and r.json()["error"]["param"] == "dimensions"
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "echo", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"model": "echo"}, "messages"),
        ({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
        ({"model": "echo", "messages": [], "max_tokens": 1}, "messages"),
    ],
)
def test_malformed_body_names_the_field(echo: Worker, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{echo.url}/v1/chat/completions", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == param
    assert f"`{param}`" in error["message"]


def test_invalid_json_is_a_400(echo: Worker) -> None:
    r = httpx.post(
        f"{echo.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


def test_context_length_is_checked_before_generating(echo: Worker) -> None:
    r = httpx.post(f"{echo.url}/v1/chat/completions", json=chat_body("word " * 60, max_tokens=10))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "context is 64 tokens; the messages take 60 and max_tokens asks for 10 more" in error["message"]
    r = httpx.post(f"{echo.url}/v1/completions", json={"model": "echo", "prompt": "w " * 70, "stream": True})
    assert r.status_code == 400 and "the prompt takes 70" in r.json()["error"]["message"]


def test_a_disconnected_stream_stops_generating(spawn: Spawn) -> None:
    spec = {"served_name": "long", "engine": "fake", "options": {"seconds_per_token": 0.01, "n_ctx": 9000}}
    worker = spawn(spec)
    body = {"model": "long", "prompt": "w " * 6000, "stream": True}  # 60 s of tokens if never stopped
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{worker.url}/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # the engine thread is free again: the next request is answered well before the 60 s would be up
    follow = {"model": "long", "messages": [{"role": "user", "content": "still served"}]}
    reply = httpx.post(f"{worker.url}/v1/chat/completions", json=follow, timeout=30)
    assert reply.json()["choices"][0]["message"]["content"] == "still served"


def test_health_and_info_while_loading_and_after() -> None:
    replica = Replica("echo", "v1", EngineRunner())
    app = WorkerApp(replica).starlette(on_startup=lambda: None)

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as client:
            loading = await client.get("/health")
            assert loading.status_code == 503 and loading.json() == {"status": "loading"}
            early = await client.post("/v1/chat/completions", json=chat_body("hi"))
            assert early.status_code == 503 and early.json()["error"]["code"] == "unavailable"
            engine = load_engine("fake", LoadSpec(name="echo", path=None))
            replica.engine, replica.info = engine, engine.info()
            ready = await client.get("/health")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            assert ready.json()["info"]["capabilities"] == ["chat", "completion", "embedding", "streaming"]
            info = (await client.get("/info")).json()
            assert info["served_name"] == "echo" and info["model_version"] == "v1"

    try:
        asyncio.run(run())
    finally:
        replica.runner.close(5)


def test_health_fails_while_an_engine_job_makes_no_progress() -> None:
    replica = Replica("echo", "v1", EngineRunner())
    engine = load_engine("fake", LoadSpec(name="echo", path=None))
    replica.engine, replica.info = engine, engine.info()
    app = WorkerApp(replica, watchdog_s=0.2).starlette(on_startup=lambda: None)
    stuck = threading.Event()

    def hang() -> None:  # an engine call that does not return
        stuck.wait()

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as client:
            assert (await client.get("/health")).status_code == 200
            replica.runner.post(hang)
            await asyncio.sleep(0.4)
            health = await client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "stuck"
            assert "no progress" in health.json()["reason"]
            stuck.set()
            await asyncio.sleep(0.05)
            assert (await client.get("/health")).status_code == 200

    try:
        asyncio.run(run())
    finally:
        stuck.set()
        replica.runner.close(5)


def test_field_path_drops_union_tags() -> None:
    assert field_path(("input", "str"), {"input": 3}, missing=False) == "input"
    assert (
        field_path(("messages", 0, "role"), {"messages": [{"role": "x"}]}, missing=False) == "messages.0.role"
    )
    assert field_path(("messages",), {}, missing=True) == "messages"


def test_checksum_mismatch_exits_3(spawn: Spawn, tmp_path: Path) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"the bytes as registered")
    recorded = hashlib.sha256(b"other bytes").hexdigest()
    spec = {"served_name": "m", "engine": "fake", "path": str(model), "sha256": recorded}
    worker = spawn(spec, wait=False)
    assert worker.proc.wait(timeout=60) == 3
    log = worker.log()
    assert str(model) in log and recorded in log
    assert hashlib.sha256(b"the bytes as registered").hexdigest() in log


def test_a_failed_load_exits_non_zero(spawn: Spawn, tmp_path: Path) -> None:
    worker = spawn({"served_name": "m", "engine": "gguf", "path": str(tmp_path / "gone.gguf")}, wait=False)
    assert worker.proc.wait(timeout=60) not in (0, None)
    assert "not found" in worker.log()


def test_sigterm_abandons_the_stream_and_exits_0(spawn: Spawn) -> None:
    worker = spawn({"served_name": "slow", "engine": "fake", "options": {"seconds_per_token": 0.05}})
    body = {"model": "slow", "prompt": "w " * 400, "stream": True}  # 20 s of tokens
    url = f"{worker.url}/v1/completions"
    with httpx.Client(timeout=30) as client, client.stream("POST", url, json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        worker.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["error"]["code"] == "unavailable"
    assert worker.proc.wait(timeout=30) == 0


def test_completion_body_with_echo(echo: Worker) -> None:
    body = {"model": "echo", "prompt": "say it", "echo": True, "max_tokens": 5}
    reply = httpx.post(f"{echo.url}/v1/completions", json=body, timeout=30).json()
    assert reply["object"] == "text_completion" and reply["model"] == "echo"
    assert reply["choices"][0]["text"] == "say itsay it"
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_real_gguf_worker(spawn: Spawn) -> None:
    spec = {"served_name": "smol", "engine": "gguf", "path": str(smollm2_path()), "options": {}}
    worker = spawn(spec, wait=False)
    seen = worker.wait_ready()
    assert all(r.json() == {"status": "loading"} for r in seen[:-1] if r.status_code == 503)
    assert seen[-1].json()["info"]["context_length"] == 4096
    url = f"{worker.url}/v1/chat/completions"
    question = {"model": "smol", "messages": [{"role": "user", "content": "Name a color."}], "temperature": 0}
    whole = httpx.post(url, json={**question, "max_tokens": 20}, timeout=60).json()
    r = httpx.post(url, json={**question, "max_tokens": 20, "stream": True}, timeout=60)
    chunks = [json.loads(e) for e in sse_events(r)[:-1]]
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert sum(1 for p in pieces if p) > 3
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"]

    long = {"model": "smol", "messages": [{"role": "user", "content": "hello " * 4000}], "max_tokens": 200}
    r = httpx.post(url, json=long, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    prompt_tokens = error["details"]["prompt_tokens"]
    assert prompt_tokens > 4000
    assert f"this model's context is 4096 tokens; the messages take {prompt_tokens}" in error["message"]
    assert "max_tokens asks for 200 more" in error["message"]

    r = httpx.post(f"{worker.url}/v1/embeddings", json={"model": "smol", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_capability"


def test_worker_workload_writes_the_spec(tmp_path: Path) -> None:
    gguf = GGUFOptions.model_validate({"n_threads": 3})
    deployment = DeploymentConfig.model_validate(
        {"name": "chat", "engine": "gguf", "replicas": 2, "gguf": gguf.model_dump()}
    )
    workload = worker_workload(
        deployment=deployment,
        engine="gguf",
        path=smollm2_path(),
        sha256="ab" * 32,
        extra_files={},
        model_version="3",
        run_dir=tmp_path / "run",
        ready_timeout_s=30.0,
    )
    assert workload.argv[:3] == (sys.executable, "-m", "lamina.models._worker")
    assert "--port" not in workload.argv, "the worker binds a port of its own choosing and reports it"
    assert workload.argv[-1].endswith("chat.json")
    assert workload.replicas == 2 and workload.health_path == "/health" and workload.ready_timeout_s == 30.0
    assert workload.resources.cpus == 3
    assert workload.resources.memory_mb >= smollm2_path().stat().st_size * 1.5 / 2**20
    spec = WorkerSpec.read(Path(workload.argv[-1]))
    assert spec.served_name == "chat" and spec.model_version == "3" and spec.sha256 == "ab" * 32
    assert spec.options == gguf.model_dump()
    fake = worker_workload(
        deployment=DeploymentConfig.model_validate(
            {"name": "echo", "engine": "fake", "fake": {"mode": "replay"}}
        ),
        engine="fake",
        path=None,
        sha256=None,
        extra_files={},
        model_version=None,
        run_dir=tmp_path / "run",
        ready_timeout_s=30.0,
    )
    assert WorkerSpec.read(Path(fake.argv[-1])).options["mode"] == "replay"


def test_a_replica_worker_loads_no_metadata_store() -> None:
    """A replica serves an engine: the registry's SQLAlchemy and Alembic (about 0.6 s of imports on two
    cores) stay out of its process, so a replacement replica is ready that much sooner."""
    script = (
        "import sys\n"
        "import lamina.models._worker, lamina.models._gguf, lamina.models._onnx, lamina.models._fake\n"
        "from lamina.models import LoadSpec, load_engine\n"
        "load_engine('fake', LoadSpec(name='f', path=None, options={})).close()\n"
        "print('STORE', sorted(m for m in sys.modules if m.split('.')[0] in {'sqlalchemy', 'alembic'}\n"
        "                      or m.startswith('lamina.store')))\n"
    )
    out = run_python(script)
    assert "STORE []" in out, out
