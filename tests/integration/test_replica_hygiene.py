"""Replica hygiene with real processes: each replica binds its own port and reports it, only the gateway
that started it (holding its secret) may call it, and a request that crashes replicas is failed after two.

The orchestration side runs the stdlib echo server (tests/support/workloads), which follows the handshake
from its documented contract alone; the models side runs the real worker with the fake engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from lamina.config import DeploymentConfig
from lamina.errors import NoReadyReplicaError, PoisonRequestError
from lamina.models import worker_workload
from lamina.models._worker import EXIT_BAD_SPEC
from lamina.models._worker import main as worker_main
from lamina.orchestration import (
    SECRET_ENV,
    SECRET_HEADER,
    Controller,
    Dispatcher,
    LocalProcessBackend,
    ProcessHandle,
    WorkloadSpec,
)
from lamina.orchestration._handshake import parse_report
from tests.support import PROCESS_WAIT_S, echo_spec

pytestmark = pytest.mark.anyio


def _wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PROCESS_WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _reported(backend: LocalProcessBackend, handle: ProcessHandle) -> str:
    """The URL the replica reported, once it has (failing the test if it exits first)."""
    _wait_until(lambda: handle.url is not None or backend.poll(handle) is not None, "a port report")
    assert handle.url is not None, backend.tail_log(handle)
    return handle.url


def _health(url: str, headers: dict[str, str]) -> int | None:
    try:
        return httpx.get(f"{url}/health", headers=headers, timeout=2.0).status_code
    except httpx.TransportError:
        return None


@pytest.mark.parametrize(
    ("data", "port"), [(b'{"port": 8123}\n', 8123), (b'{"port": 1}\n', 1), (b'{"port": 65535}\n', 65535)]
)
def test_a_port_report_is_one_json_line(data: bytes, port: int) -> None:
    assert parse_report(data) == port


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b'{"port": 8123}',
        b'{"port": 0}\n',
        b'{"port": 70000}\n',
        b'{"port": "80"}\n',
        b'{"port": true}\n',
        b"[8123]\n",
        b'{"port": 8123}\n' + b" " * 300,
    ],
)
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_report(data)


def test_an_echo_replica_reports_the_port_it_bound_and_wants_its_secret(tmp_path: Path) -> None:
    backend = LocalProcessBackend(tmp_path / "logs")
    handle = backend.start(echo_spec(), "echo-0")
    try:
        url = _reported(backend, handle)
        assert f"serving on 127.0.0.1:{handle.port}" in backend.tail_log(handle)
        assert backend.secret_for(url) == handle.secret and len(handle.secret) >= 40
        _wait_until(lambda: _health(url, {SECRET_HEADER: handle.secret}) == 200, "a healthy replica")
        assert _health(url, {}) == 401
        assert _health(url, {SECRET_HEADER: handle.secret[:-1] + "x"}) == 401
        assert handle.secret not in " ".join(psutil.Process(handle.pid).cmdline()), "argv is public"
        assert handle.secret not in repr(handle)
        assert backend.secret_for("http://127.0.0.1:1") is None
        os.kill(handle.pid, signal.SIGKILL)  # no one polls it: the backend sees it gone within LIVENESS_S
        _wait_until(lambda: backend.secret_for(url) is None, "a killed replica's URL to get no secret")
    finally:
        backend.stop(handle, grace_s=2.0)
    assert backend.secret_for(url) is None, "a stopped replica's URL gets no secret any more"


def test_a_replica_that_reports_nonsense_never_gets_a_url(tmp_path: Path) -> None:
    backend = LocalProcessBackend(tmp_path / "logs")
    handle = backend.start(echo_spec(env={"ECHO_REPORT": "listening on 8080"}), "liar-0")
    try:
        _wait_until(lambda: handle.report_problem is not None or handle.url is not None, "the report")
        assert handle.url is None
        assert handle.report_problem is not None and "'listening on 8080" in handle.report_problem
    finally:
        backend.stop(handle, grace_s=2.0)


def test_the_model_worker_binds_its_own_port_and_guards_every_endpoint(tmp_path: Path) -> None:
    deployment = DeploymentConfig.model_validate({"name": "echo", "engine": "fake"})
    workload = worker_workload(
        deployment=deployment,
        engine="fake",
        path=None,
        sha256=None,
        extra_files={},
        model_version=None,
        run_dir=tmp_path / "run",
        ready_timeout_s=60.0,
    )
    assert "--port" not in workload.argv
    backend = LocalProcessBackend(tmp_path / "logs")
    # a name to answer besides loopback, as a pod behind a Service needs
    pod = dataclasses.replace(workload, argv=(*workload.argv, "--allow-host", "echo.pods.internal"))
    handle = backend.start(pod, "echo-0")
    try:
        url = _reported(backend, handle)
        secret = {SECRET_HEADER: handle.secret}
        _wait_until(lambda: _health(url, secret) == 200, "the worker to load the fake engine")
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi there"}]}
        ok = httpx.post(f"{url}/v1/chat/completions", json=body, headers=secret, timeout=10)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "hi there"
        for path in ("/health", "/info"):
            refused = httpx.get(f"{url}{path}", timeout=10)
            assert refused.status_code == 401, path
            assert refused.json()["error"]["code"] == "invalid_api_key"
            assert SECRET_HEADER in refused.json()["error"]["message"]
        anonymous = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert anonymous.status_code == 401
        # an OpenAI client (the gateway's relay to a pod) sends the secret as its API key
        bearer = {"Authorization": f"Bearer {handle.secret}"}
        assert (
            httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer, timeout=10).status_code == 200
        )
        wrong = {"Authorization": f"Bearer {handle.secret[:-1]}x"}
        assert (
            httpx.post(f"{url}/v1/chat/completions", json=body, headers=wrong, timeout=10).status_code == 401
        )
        # DNS rebinding: a page whose name now resolves to 127.0.0.1 sends its own name as Host
        rebound = httpx.get(f"{url}/health", headers={**secret, "Host": "attacker.example"}, timeout=10)
        assert rebound.status_code == 400
        named = httpx.get(f"{url}/health", headers={**secret, "Host": f"localhost:{handle.port}"}, timeout=10)
        assert named.status_code == 200
        pod_name = httpx.get(f"{url}/health", headers={**secret, "Host": "echo.pods.internal"}, timeout=10)
        assert pod_name.status_code == 200
        assert handle.secret not in " ".join(psutil.Process(handle.pid).cmdline())
    finally:
        assert backend.stop(handle, grace_s=5.0) == 0


def test_the_worker_refuses_to_start_without_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"served_name": "echo", "engine": "fake"}')
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert worker_main(["--spec", str(spec)]) == EXIT_BAD_SPEC
    assert f"set {SECRET_ENV}" in capsys.readouterr().err


# ---- a request that crashes replicas ---------------------------------------------------------------------


@asynccontextmanager
async def _serving(
    tmp_path: Path, spec: WorkloadSpec, retry_deadline_s: float = 60.0
) -> AsyncIterator[tuple[Controller, Dispatcher]]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0)) as http:
        backend = LocalProcessBackend(tmp_path / "logs")
        controller = Controller(backend, http=http, health_interval_s=0.1, restart_backoff_s=0.05)
        controller.apply([spec])
        stop = asyncio.Event()
        loop = asyncio.create_task(controller.run(stop))
        try:
            assert await controller.wait_ready(PROCESS_WAIT_S), controller.status()
            yield controller, Dispatcher(controller, http, backend, retry_deadline_s=retry_deadline_s)
        finally:
            stop.set()
            await loop
            await controller.shutdown(grace_s=2.0)
    assert psutil.Process().children(recursive=True) == []


async def test_a_request_that_crashed_two_replicas_is_failed_not_replayed(tmp_path: Path) -> None:
    spec = echo_spec(replicas=2, env={"ECHO_CRASH_MARKER": "poison pill"})
    async with _serving(tmp_path, spec) as (controller, dispatcher):
        first = {r.replica_id: r.pid for r in controller.ready_replicas("echo")}
        with pytest.raises(PoisonRequestError) as caught:
            await dispatcher.request("echo", "/echo", {"text": "a poison pill"})
        error = caught.value
        assert error.status == 422 and error.code == "poison_request"
        assert sorted(error.details["replicas"]) == ["echo-0", "echo-1"], "one try on each, no more"
        assert "crashed 2 replicas of 'echo' (echo-" in error.message
        assert "not retried further" in error.message and "change the request" in error.message
        statuses = {r.replica_id: r for d in controller.status() for r in d.replicas}
        assert all(statuses[rid].pid != pid for rid, pid in first.items()), "both died (and restart)"
        # the deployment recovers, and other requests are served as before
        assert await controller.wait_ready(PROCESS_WAIT_S), controller.status()
        fine = await dispatcher.request("echo", "/echo", {"text": "a harmless one"})
        assert fine.response.status_code == 200 and fine.attempts == 1


async def test_with_one_replica_the_request_fails_after_crashing_it_twice(tmp_path: Path) -> None:
    spec = echo_spec(replicas=1, env={"ECHO_CRASH_MARKER": "poison pill"})
    async with _serving(tmp_path, spec) as (controller, dispatcher):
        with pytest.raises(PoisonRequestError) as caught:
            await dispatcher.request("echo", "/echo", {"text": "a poison pill"})
        assert caught.value.details["replicas"] == ["echo-0", "echo-0"]
        (replica,) = controller.status()[0].replicas
        assert replica.restarts >= 1, "it was restarted after the first crash, and crashed again"


async def test_a_transport_error_from_a_live_replica_is_a_plain_retry(tmp_path: Path) -> None:
    """The replica drops the connection without answering but keeps running: no death is counted, so the
    request is retried (until the retry deadline here, since this replica drops it every time)."""
    spec = echo_spec(replicas=1, env={"ECHO_DROP_MARKER": "hang up"})
    async with _serving(tmp_path, spec, retry_deadline_s=1.5) as (controller, dispatcher):
        (replica,) = controller.ready_replicas("echo")
        with pytest.raises(NoReadyReplicaError) as caught:
            await dispatcher.request("echo", "/echo", {"text": "hang up on me"})
        assert caught.value.details["attempts"] >= 2
        (now,) = controller.status()[0].replicas
        assert now.pid == replica.pid and now.restarts == 0, "the replica never died"
        assert (await dispatcher.request("echo", "/echo", {"text": "fine"})).response.status_code == 200
