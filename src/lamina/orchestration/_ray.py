"""Replicas as Ray actors, and a Ray cluster's inventory (``pip install lamina[ray]``; jobs: ``_ray_jobs``).

:class:`RayReplicaBackend` implements the same :class:`~lamina.orchestration._local.ReplicaBackend` as
local processes, so the controller does not change: each replica is a Ray actor, placed by Ray with the
workload's CPUs, GPUs and memory as its resources, that starts the worker process on its node with a
:class:`~lamina.orchestration._local.LocalProcessBackend` of its own (the same handshake: the replica binds
its port, reports it, and holds its secret) and tells the gateway its URL and secret. A replica on another
node than the gateway binds that node's address instead of loopback. The worker dies with its actor (the
trampoline's parent-death signal), and the actor with the gateway's Ray driver (actors are not detached).

Every call from the controller's event loop is short: ``start`` only creates the actor and asks it to
start the process; ``url`` looks for the actor's answer without waiting (None until the replica reported
its port, as locally); ``poll`` waits 50 ms at most (a later answer is read at the next step). When the
process has exited, the backend keeps the end of its log and kills the actor, so that a restart (a new
actor) leaks nothing.

Ray is imported only when a backend, runner or inventory is made: ``lamina`` runs without it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lamina.compute import CPUInfo, GPUInfo, NodeInventory, probe_inventory
from lamina.errors import ConfigError
from lamina.logs import LOG_FORMAT_ENV
from lamina.orchestration._local import LocalProcessBackend, ProcessHandle
from lamina.orchestration._workload import WorkloadSpec

log = logging.getLogger(__name__)

_MIB = 1 << 20
_TAIL_BYTES = 64 * 1024
#: how long ``poll`` waits for an actor's answer; a later answer is read at the next poll
_POLL_WAIT_S = 0.05
#: what poll reports for a replica whose actor died (with its node, or killed): as SIGKILL would
ACTOR_LOST = -int(signal.SIGKILL)


def import_ray() -> Any:
    """The ``ray`` module; a ConfigError that says how to install it when it is missing."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ConfigError(
            f"orchestration.backend is ray, but Ray is not installed ({exc}); install it with "
            "`pip install 'lamina[ray]'`, or set orchestration.backend to local"
        ) from exc


def connect(ray: Any, address: str | None, temp_dir: Path | None, **init: Any) -> bool:
    """Connect to the Ray cluster at ``address`` ("auto", "ray://host:10001"), or start a local one (None)
    with its files under ``temp_dir``; returns True when this call started Ray (it is then ours to stop)."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"namespace": "lamina", "log_to_driver": False, **init}
    if address is None:
        options.setdefault("include_dashboard", False)
        if temp_dir is not None:
            temp_dir.mkdir(parents=True, exist_ok=True)
            options["_temp_dir"] = str(temp_dir.resolve())
    ray.init(address=address, **options)
    return True


class _ReplicaActor:
    """Runs on the replica's node: one worker process, started with the local backend."""

    def __init__(self, log_dir: str) -> None:
        self._backend = LocalProcessBackend(Path(log_dir))
        self._handle: ProcessHandle | None = None
        self._host = "127.0.0.1"

    def start(self, spec: WorkloadSpec, replica_id: str, driver_ip: str) -> dict[str, Any]:
        ray = import_ray()
        node_ip = ray.util.get_node_ip_address()
        if node_ip != driver_ip:  # the gateway is elsewhere: serve on this node's address
            self._host = node_ip
            spec = replace(spec, argv=tuple(node_ip if a == "127.0.0.1" else a for a in spec.argv))
        self._handle = self._backend.start(spec, replica_id)
        return {"pid": self._handle.pid, "node_ip": node_ip, "log_path": str(self._handle.log_path)}

    def url(self) -> tuple[str, str] | None:
        """The replica's URL and secret, once it has reported its port."""
        h = self._handle
        if h is None or h.port is None:
            return None
        return f"http://{self._host}:{h.port}", h.secret

    def poll(self) -> int | None:
        return None if self._handle is None else self._backend.poll(self._handle)

    def stop(self, grace_s: float) -> int | None:
        return None if self._handle is None else self._backend.stop(self._handle, grace_s)

    def tail_log(self, lines: int) -> str:
        return "" if self._handle is None else self._backend.tail_log(self._handle, lines)


@functools.cache
def _actor_class() -> Any:
    return import_ray().remote(max_restarts=0, max_concurrency=1)(_ReplicaActor)


@dataclass(eq=False)
class RayReplicaHandle:
    """A replica started as a Ray actor; ``url`` is None until the replica reported its port."""

    replica_id: str
    actor: Any = field(repr=False)
    log_path: Path
    _started: Any = field(repr=False)
    _url_ref: Any = field(default=None, repr=False)
    _url: str | None = None
    secret: str | None = field(default=None, repr=False)
    _pid: int | None = None
    #: the end of the log, kept once the process has exited (its actor is gone then)
    last_tail: str | None = None
    exit_code: int | None = None
    #: the actor's answer to the last ``poll`` not read yet
    poll_ref: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        """The worker's pid on its node (None while the actor is being placed)."""
        if self._pid is None and ready(self._started):
            with contextlib.suppress(Exception):
                self._pid = int(import_ray().get(self._started)["pid"])
        return self._pid

    @property
    def url(self) -> str | None:
        if self._url is None and self.exit_code is None:
            if self._url_ref is None:
                self._url_ref = self.actor.url.remote()
            if ready(self._url_ref):
                ref, self._url_ref = self._url_ref, None
                with contextlib.suppress(Exception):  # a dead actor: poll says so
                    answer = import_ray().get(ref)
                    if answer is not None:
                        self._url, self.secret = answer
        return self._url


def ready(ref: Any) -> bool:
    ready, _ = import_ray().wait([ref], timeout=0)
    return bool(ready)


class RayReplicaBackend:
    """Starts each replica as a Ray actor on a cluster (``address``) or on a local Ray this backend starts."""

    def __init__(
        self,
        log_dir: Path,
        *,
        address: str | None = None,
        temp_dir: Path | None = None,
        call_timeout_s: float = 5.0,
        init: Mapping[str, Any] | None = None,
    ) -> None:
        self._ray = import_ray()
        self._log_dir = log_dir
        self._started_ray = connect(self._ray, address, temp_dir, **dict(init or {}))
        self._driver_ip = self._ray.util.get_node_ip_address()
        self._call_timeout_s = call_timeout_s
        self._live: dict[str, RayReplicaHandle] = {}

    def start(self, spec: WorkloadSpec, replica_id: str) -> RayReplicaHandle:
        """Create the replica's actor with the workload's resources and ask it to start the process."""
        res = spec.resources
        log_format = os.environ.get(LOG_FORMAT_ENV)
        if log_format and LOG_FORMAT_ENV not in spec.env:  # a node elsewhere has its own environment
            spec = replace(spec, env={**spec.env, LOG_FORMAT_ENV: log_format})
        actor = _actor_class().options(
            num_cpus=res.cpus, num_gpus=res.gpus, memory=res.memory_mb * _MIB, name=None
        )
        created = actor.remote(str(self._log_dir))
        started = created.start.remote(spec, replica_id, self._driver_ip)
        handle = RayReplicaHandle(replica_id, created, self._log_dir / f"{replica_id}.log", started)
        self._live[replica_id] = handle
        return handle

    def secret_for(self, url: str) -> str | None:
        for handle in self._live.values():
            if handle.exit_code is None and handle.url == url:
                return handle.secret
        return None

    def poll(self, handle: RayReplicaHandle) -> int | None:
        """The worker's exit code once it has exited, ``ACTOR_LOST`` when its actor died; else None."""
        if handle.exit_code is not None:
            return handle.exit_code
        ray = self._ray
        if handle.poll_ref is None:
            handle.poll_ref = handle.actor.poll.remote()
        ready, _ = ray.wait([handle.poll_ref], timeout=_POLL_WAIT_S)
        if not ready:  # still being placed, or busy: ask again at the next step, never block the loop
            return None
        ref, handle.poll_ref = handle.poll_ref, None
        try:
            answer = ray.get(ref)
            code = None if answer is None else int(answer)
        except ray.exceptions.RayError as exc:
            log.warning("replica %s: its Ray actor is gone (%s)", handle.replica_id, type(exc).__name__)
            code = ACTOR_LOST
        if code is not None:
            self._finish(handle, code)
        return code

    def _finish(self, handle: RayReplicaHandle, code: int) -> None:
        """Keep the log's end, then kill the actor: its process has exited."""
        if handle.last_tail is None:
            handle.last_tail = self._remote_tail(handle, 20)
        handle.exit_code = code
        self._kill(handle)

    def _kill(self, handle: RayReplicaHandle) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(handle.actor, no_restart=True)
        if self._live.get(handle.replica_id) is handle:
            del self._live[handle.replica_id]

    def stop(self, handle: RayReplicaHandle, grace_s: float = 5.0) -> int | None:
        """SIGTERM the worker, SIGKILL it after ``grace_s``, then end its actor. Blocks; never raises."""
        if handle.exit_code is not None:
            return handle.exit_code
        ray = self._ray
        try:
            answer = ray.get(handle.actor.stop.remote(grace_s), timeout=grace_s + self._call_timeout_s)
            code = None if answer is None else int(answer)
        except ray.exceptions.GetTimeoutError:
            code = None  # killing the actor below ends the worker (its parent-death signal)
        except ray.exceptions.RayError:
            code = ACTOR_LOST  # the actor, and with it the worker, is gone already
        self._finish(handle, ACTOR_LOST if code is None else code)
        return code

    def tail_log(self, handle: RayReplicaHandle, lines: int = 20) -> str:
        if handle.last_tail is not None:
            return "\n".join(handle.last_tail.splitlines()[-lines:])
        return self._remote_tail(handle, lines)

    def _remote_tail(self, handle: RayReplicaHandle, lines: int) -> str:
        ray = self._ray
        try:
            return str(ray.get(handle.actor.tail_log.remote(lines), timeout=self._call_timeout_s))
        except ray.exceptions.RayError:  # GetTimeoutError too
            return _tail_file(handle.log_path, lines)  # the actor is gone; on this node, its log is here

    def close(self) -> None:
        """Kill every actor still alive, and stop Ray if this backend started it."""
        for handle in list(self._live.values()):
            self._kill(handle)
        if self._started_ray:
            self._ray.shutdown()


def _tail_file(path: Path, lines: int) -> str:
    try:
        text = path.read_bytes()[-_TAIL_BYTES:].decode("utf-8", errors="replace").rstrip("\n")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ---- inventory -----------------------------------------------------------------------------------------


def ray_node_inventory(node: Mapping[str, Any]) -> NodeInventory:
    """What Ray itself knows of a node (an entry of ``ray.nodes()``), for one whose own probe did not
    answer: its CPUs, memory and GPUs as Ray's resources count them."""
    res: Mapping[str, float] = node.get("Resources", {})
    cpus = max(1, int(res.get("CPU", 1)))
    kind = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), "GPU")
    gpus = tuple(GPUInfo(i, kind, "", 0, 0) for i in range(int(res.get("GPU", 0))))
    memory = int(res.get("memory", 0))
    return NodeInventory(
        hostname=str(node.get("NodeManagerHostname") or node.get("NodeManagerAddress")),
        cpu=CPUInfo("unknown", cpus, cpus, tuple(range(cpus)), cpus),
        memory_total_bytes=memory,
        memory_available_bytes=memory,
        gpus=gpus,
        gpu_note="from Ray's resources only: the node's own probe did not answer",
    )


def ray_inventory(timeout_s: float = 30.0) -> list[NodeInventory]:
    """Each live node of the connected Ray cluster, probed on the node itself (a zero-CPU task pinned to
    it runs :func:`~lamina.compute.probe_inventory`); a node that does not answer in ``timeout_s`` is
    described from the resources Ray knows of."""
    ray = import_ray()
    on_node = importlib.import_module("ray.util.scheduling_strategies").NodeAffinitySchedulingStrategy
    probe = ray.remote(num_cpus=0, max_retries=0)(probe_inventory)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [probe.options(scheduling_strategy=on_node(n["NodeID"], soft=False)).remote() for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = {ref.hex() for ref in ready}
    found: list[NodeInventory] = []
    for node, ref in zip(nodes, refs, strict=True):
        try:
            found.append(ray.get(ref) if ref.hex() in done else ray_node_inventory(node))
        except ray.exceptions.RayError:
            found.append(ray_node_inventory(node))
    for ref in refs:
        if ref.hex() not in done:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
    return found
