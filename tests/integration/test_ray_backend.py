"""The Ray backend against a real local Ray, started once for the module (2 CPUs, no dashboard, its files
under a temp folder): a fake-engine replica run by the real Controller as a Ray actor, served, killed and
restarted; the cluster's inventory; jobs as Ray tasks."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from lamina.compute import probe_inventory
from lamina.config import DeploymentConfig, LaminaConfig
from lamina.errors import InvalidRequestError, NotFoundError
from lamina.logs import LOG_FORMAT_ENV
from lamina.models import worker_workload
from lamina.orchestration import (
    SECRET_HEADER,
    Controller,
    RayJobRunner,
    RayReplicaBackend,
    ReplicaState,
    ReplicaStatus,
    ray_inventory,
    ray_node_inventory,
)
from lamina.stack import backend_nodes, ray_temp_dir, replica_backend

ray = pytest.importorskip("ray", reason="Ray is not installed: `pip install 'lamina[ray]'` runs these tests")

pytestmark = pytest.mark.slow

WAIT_S = 90.0


@pytest.fixture(scope="module")
def backend() -> Iterator[RayReplicaBackend]:
    # short: Ray's unix sockets live under it, and a socket path holds 107 bytes at most
    root = Path(tempfile.mkdtemp(prefix="lamina-ray-"))
    started = time.monotonic()
    ray_backend = RayReplicaBackend(
        root / "logs", temp_dir=root / "ray", init={"num_cpus": 2, "_node_ip_address": "127.0.0.1"}
    )
    print(f"\nlocal Ray started in {time.monotonic() - started:.1f} s")
    try:
        yield ray_backend
    finally:
        ray_backend.close()
        shutil.rmtree(root, ignore_errors=True)


@asynccontextmanager
async def running(backend: RayReplicaBackend, tmp_path: Path) -> AsyncIterator[Controller]:
    deployment = DeploymentConfig(name="echo", engine="fake", replicas=1)
    spec = worker_workload(
        deployment=deployment,
        engine="fake",
        path=None,
        sha256=None,
        extra_files={},
        model_version=None,
        run_dir=tmp_path / "run",
        ready_timeout_s=WAIT_S,
    )
    async with httpx.AsyncClient() as http:
        controller = Controller(backend, http=http, health_interval_s=0.2, restart_backoff_s=0.1)
        controller.apply([spec])
        stop = asyncio.Event()
        loop = asyncio.create_task(controller.run(stop))
        try:
            yield controller
        finally:
            stop.set()
            await loop
            await controller.shutdown(grace_s=5.0)


def only_replica(controller: Controller) -> ReplicaStatus:
    (status,) = controller.status()
    (replica,) = status.replicas
    return replica


async def ready_after(controller: Controller, restarts: int) -> ReplicaStatus:
    """The replica once it is ready again after ``restarts`` restarts."""
    deadline = time.monotonic() + WAIT_S
    while True:
        replica = only_replica(controller)
        if replica.restarts >= restarts and replica.state is ReplicaState.READY:
            return replica
        assert time.monotonic() < deadline, f"not ready again in time: {replica}"
        await controller.wait_for_change(0.5)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} outlived its replica"
        await asyncio.sleep(0.1)


@pytest.mark.anyio
async def test_replica_as_ray_actor_serves_dies_and_is_restarted(
    backend: RayReplicaBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the gateway's log format, set after Ray started (as on a cluster whose nodes never had it)
    monkeypatch.setenv(LOG_FORMAT_ENV, "json")
    started = time.monotonic()
    async with running(backend, tmp_path) as controller:
        assert await controller.wait_ready(WAIT_S), controller.explain("echo")
        print(f"\nfirst replica ready through Ray in {time.monotonic() - started:.1f} s")
        replica = only_replica(controller)
        assert replica.url is not None and replica.pid is not None
        first_line = backend.tail_log(backend._live[replica.replica_id], 200).splitlines()[0]
        assert json.loads(first_line)["level"] == "INFO", first_line  # the replica writes the same format
        secret = backend.secret_for(replica.url)
        assert secret is not None
        async with httpx.AsyncClient(headers={SECRET_HEADER: secret}, timeout=30) as client:
            health = await client.get(replica.url + "/health")
            assert health.status_code == 200
            body = {"model": "echo", "messages": [{"role": "user", "content": "hello ray"}]}
            chat = await client.post(replica.url + "/v1/chat/completions", json=body)
            assert chat.status_code == 200, chat.text
            assert chat.json()["choices"][0]["message"]["content"]
            refused = await client.get(replica.url + "/health", headers={SECRET_HEADER: "not-it"})
            assert refused.status_code == 401

        # the worker process dies: its actor reports the exit, the controller starts a new actor
        first_pid = replica.pid
        os.kill(first_pid, signal.SIGKILL)
        restarted = await ready_after(controller, restarts=1)
        assert restarted.pid != first_pid and restarted.last_exit_code == -signal.SIGKILL
        assert backend.secret_for(replica.url) is None  # the dead replica's URL is no longer trusted

        # the actor itself dies (as with its node): the worker goes with it, and is replaced again
        assert restarted.pid is not None
        actor_process = psutil.Process(restarted.pid).parent()
        assert actor_process is not None
        actor_process.kill()
        await wait_gone(restarted.pid)
        again = await ready_after(controller, restarts=2)
        assert again.pid not in (first_pid, restarted.pid)
        last_pid = again.pid
    assert last_pid is not None
    await wait_gone(last_pid)  # shutdown stopped the worker


def test_inventory_of_the_ray_cluster_is_probed_on_its_node(backend: RayReplicaBackend) -> None:
    (node,) = ray_inventory(timeout_s=WAIT_S)
    here = probe_inventory()
    assert node.hostname == socket.gethostname()
    assert node.cpu.logical == here.cpu.logical and node.memory_total_bytes == here.memory_total_bytes
    assert len(node.gpus) == len(here.gpus)
    # a node whose own probe does not answer is described from Ray's resources
    (raw,) = [n for n in ray.nodes() if n["Alive"]]
    fallback = ray_node_inventory(raw)
    assert fallback.cpu.logical == 2 and fallback.memory_total_bytes > 0
    assert fallback.gpu_note is not None and "Ray's resources" in fallback.gpu_note


async def _status(runner: RayJobRunner, job_id: str, until: set[str]) -> tuple[str, object, str | None]:
    deadline = time.monotonic() + WAIT_S
    while (status := runner.poll(job_id)).state not in until:
        assert time.monotonic() < deadline, f"job {job_id} still {status.state}"
        await asyncio.sleep(0.1)
    return status.state, status.result, status.error


@pytest.mark.anyio
async def test_jobs_run_as_ray_tasks(backend: RayReplicaBackend) -> None:
    runner = RayJobRunner()  # Ray is up already: it connects
    ok = runner.submit("math:factorial", (10,), cpus=0.5)
    bad = runner.submit("json:loads", ("{not json",), cpus=0.5)
    long = runner.submit("time:sleep", (120,), cpus=0.5)
    assert await _status(runner, ok, {"succeeded", "failed"}) == ("succeeded", math.factorial(10), None)
    state, _, error = await _status(runner, bad, {"succeeded", "failed"})
    assert state == "failed" and error is not None and "JSONDecodeError" in error
    assert runner.poll(long).state == "running"
    runner.cancel(long)
    assert (await _status(runner, long, {"cancelled", "failed", "succeeded"}))[0] == "cancelled"
    with pytest.raises(InvalidRequestError, match="module:function"):
        runner.submit("math.factorial")
    with pytest.raises(NotFoundError):
        runner.poll("no-such-job")


def test_the_config_chooses_the_backend(backend: RayReplicaBackend, tmp_path: Path) -> None:
    orch = LaminaConfig.model_validate({"orchestration": {"backend": "ray"}}).orchestration
    chosen = replica_backend(orch, tmp_path)  # Ray runs already (the module's): it joins it
    assert isinstance(chosen, RayReplicaBackend)
    (node,) = backend_nodes(chosen)
    assert node.hostname == socket.gethostname()
    local = replica_backend(LaminaConfig().orchestration, tmp_path)
    assert not isinstance(local, RayReplicaBackend) and len(backend_nodes(local)) == 1
    with pytest.raises(ValueError, match="backend"):
        LaminaConfig.model_validate({"orchestration": {"backend": "k8s"}})
    # Ray's sockets live under its temp dir, and a socket path holds 107 bytes at most
    assert ray_temp_dir(Path("/srv/l")) == Path("/srv/l/ray")
    deep = ray_temp_dir(tmp_path / ("x" * 80))
    assert len(str(deep)) < 48 and deep == ray_temp_dir(tmp_path / ("x" * 80))
