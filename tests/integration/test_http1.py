"""The gateway's HTTP/1.1 client for its replicas, against a real uvicorn server (httptools, as replica
workers run): whole and streamed answers, connection reuse, a connection the server closed while idle,
a server that dies mid-answer, refused connections, and a stream left early."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from lamina.orchestration._http1 import Http1Client
from tests.support import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param(False, id="asyncio"), pytest.param(True, id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """The gateway runs on uvloop (uvicorn's choice when installed); tests elsewhere on asyncio's loop."""
    return ("asyncio", {"use_uvloop": request.param})


APP_DIR = Path(__file__).resolve().parents[1] / "support"


def _serve(port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "uvicorn", "h1_app:app", "--port", str(port), "--http", "httptools"]
    argv += ["--timeout-keep-alive", "1", "--log-level", "warning", "--app-dir", str(APP_DIR)]
    proc = subprocess.Popen(argv)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/json", json={}, timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the test server did not start")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    proc = _serve(port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    client = Http1Client()
    yield client
    await client.aclose()


async def test_a_json_answer_and_the_connection_is_reused(server: str, client: Http1Client) -> None:
    body = {"text": "héllo \u2028", "n": [1, 2.5, None]}
    first = await client.post(f"{server}/json", json=body, headers={"X-Test": "yes"})
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert first.json()["got"] == body and first.json()["x_test"] == "yes"
    [conn] = client._idle[("127.0.0.1", int(server.rsplit(":", 1)[1]))]
    second = await client.post(f"{server}/json", json={"again": True})
    assert second.json()["got"] == {"again": True}
    assert client._idle[("127.0.0.1", int(server.rsplit(":", 1)[1]))] == [conn]  # the same connection
    refused = await client.post(f"{server}/status", json={"status": 429})
    assert (refused.status_code, refused.json()) == (429, {"error": {"message": "asked for"}})


async def test_a_stream_comes_chunk_by_chunk(server: str, client: Http1Client) -> None:
    chunks = [{"i": i} for i in range(5)]
    seen: list[tuple[float, bytes]] = []
    start = time.monotonic()
    async with client.stream("POST", f"{server}/stream", json={"chunks": chunks, "delay_s": 0.1}) as r:
        assert r.status_code == 200
        async for part in r.aiter_raw():
            seen.append((time.monotonic() - start, part))
    lines = b"".join(p for _, p in seen).decode().splitlines()
    assert [json.loads(line) for line in lines] == chunks
    assert seen[0][0] < 0.3  # the first line came before the server finished (0.4 s later)
    again = await client.post(f"{server}/json", json={"after": "stream"})  # the connection went back
    assert again.status_code == 200


async def test_a_connection_the_server_closed_while_idle_is_not_an_error(
    server: str, client: Http1Client
) -> None:
    assert (await client.post(f"{server}/json", json={})).status_code == 200
    time.sleep(1.5)  # past the server's keep-alive timeout (1 s): it closed the connection
    assert (await client.post(f"{server}/json", json={"later": 1})).json()["got"] == {"later": 1}


async def test_a_stream_left_early_closes_its_connection(server: str, client: Http1Client) -> None:
    body = {"chunks": list(range(50)), "delay_s": 0.05}
    async with client.stream("POST", f"{server}/stream", json=body) as r:
        async for _ in r.aiter_raw():
            break
    assert not any(client._idle.values())  # half-read: never pooled
    assert (await client.post(f"{server}/json", json={"next": 1})).status_code == 200


async def test_a_server_that_dies_mid_answer_and_one_that_is_gone(client: Http1Client) -> None:
    port = free_port()
    proc = _serve(port)
    try:
        with pytest.raises(httpx.ReadError):
            body = {"chunks": list(range(10)), "die_after": 3}
            async with client.stream("POST", f"http://127.0.0.1:{port}/stream", json=body) as r:
                async for _ in r.aiter_raw():
                    pass
    finally:
        proc.kill()
        proc.wait(10)
    with pytest.raises(httpx.ConnectError, match="cannot connect"):
        await client.post(f"http://127.0.0.1:{port}/json", json={})


async def test_a_request_that_kills_the_server_on_a_reused_connection_counts_as_sent(
    client: Http1Client,
) -> None:
    """The pooled connection closes before any byte of the answer, as one closed while idle would; the
    retry cannot connect, so the first error stands: the dispatcher must count the request as sent (the
    process died of it), not as never delivered (a fresh-clone run of session 16: a poison prompt crashed a
    third replica)."""
    port = free_port()
    proc = _serve(port)
    try:
        assert (await client.post(f"http://127.0.0.1:{port}/json", json={})).status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(f"http://127.0.0.1:{port}/json", json={"die": True})
        assert proc.wait(10) == 3
    finally:
        proc.kill()
        proc.wait(10)
