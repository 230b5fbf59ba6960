"""What a machine has: CPU cores, memory and NVIDIA GPUs, read into a frozen record per node.

CPUs come from the kernel (``/proc/cpuinfo``, the topology in ``/sys``, the process's affinity mask) and
psutil; memory from psutil; GPUs from NVML (:mod:`lamina.compute._gpus`). The machine's devices are one
:class:`NodeInventory`; a cluster is several (the inventory of a Ray cluster will add nodes). Thread
defaults are decided here, once: :func:`default_threads` counts the physical cores this process may run on.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pynvml

from lamina.compute._gpus import GPUInfo, read_gpus

SYS_CPU = Path("/sys/devices/system/cpu")
PROC_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CPUInfo:
    """The CPUs of a node, and which of them this process may use."""

    model: str
    physical: int
    logical: int
    #: logical CPUs this process may run on (its affinity mask: fewer than ``logical`` when pinned)
    affinity: tuple[int, ...]
    #: physical cores under the affinity mask (two hyper-threads of one core count once)
    usable_physical: int
    #: 1, 5 and 15 minute load averages (runnable processes); zeros where the OS has none
    load_avg: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def usable(self) -> int:
        return len(self.affinity)


@dataclass(frozen=True)
class NodeInventory:
    """One node's compute, as placement, will-it-fit and thread defaults need it."""

    hostname: str
    cpu: CPUInfo
    memory_total_bytes: int
    memory_available_bytes: int
    gpus: tuple[GPUInfo, ...] = ()
    nvidia_driver: str | None = None
    #: why there are no GPUs ("no NVIDIA driver (...)"), or None when NVML answered
    gpu_note: str | None = field(default=None)


def _cpu_model(cpuinfo: Path) -> str:
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Processor") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _affinity(logical: int) -> tuple[int, ...]:
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows: no affinity masks
        return tuple(range(logical))


def _core_of(cpu: int, sys_cpu: Path) -> tuple[str, str] | None:
    """The (package, core) a logical CPU sits on, from the kernel's topology; None where it cannot be read."""
    topology = sys_cpu / f"cpu{cpu}" / "topology"
    try:
        return (topology / "physical_package_id").read_text().strip(), (
            topology / "core_id"
        ).read_text().strip()
    except OSError:
        return None


def physical_cores_of(cpus: Iterable[int], sys_cpu: Path = SYS_CPU) -> int | None:
    """The physical cores that ``cpus`` (logical CPU numbers) sit on, from the kernel's topology; None
    where it cannot be read (not Linux, or a CPU without a topology directory)."""
    cores = [_core_of(cpu, sys_cpu) for cpu in cpus]
    return None if None in cores else len(set(cores)) or None


def core_cpus(cpus: Iterable[int], sys_cpu: Path = SYS_CPU) -> list[int]:
    """The first of ``cpus`` on each physical core, in CPU order (a compute-bound thread per core, none on
    a core's hyper-thread sibling); ``cpus`` themselves, sorted, where the topology cannot be read."""
    ordered = sorted(set(cpus))
    chosen: dict[tuple[str, str], int] = {}
    for cpu in ordered:
        core = _core_of(cpu, sys_cpu)
        if core is None:
            return ordered
        chosen.setdefault(core, cpu)
    return sorted(chosen.values())


def read_cpus(sys_cpu: Path = SYS_CPU, cpuinfo: Path = PROC_CPUINFO) -> CPUInfo:
    """This machine's CPUs and the part of them this process may use."""
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    affinity = _affinity(logical)
    usable = physical_cores_of(affinity, sys_cpu)
    if usable is None:  # no topology: assume the mask is spread like the machine (hyper-threads pro rata)
        usable = max(1, min(physical, len(affinity) * physical // logical))
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return CPUInfo(
        model=_cpu_model(cpuinfo),
        physical=physical,
        logical=logical,
        affinity=affinity,
        usable_physical=usable,
        load_avg=(load[0], load[1], load[2]),
    )


def probe_inventory(nvml: Any = pynvml) -> NodeInventory:
    """Read this machine's CPUs, memory and GPUs (``nvml``: the ``pynvml`` module or a double of it)."""
    memory = psutil.virtual_memory()
    reading = read_gpus(nvml)
    return NodeInventory(
        hostname=socket.gethostname(),
        cpu=read_cpus(),
        memory_total_bytes=int(memory.total),
        memory_available_bytes=int(memory.available),
        gpus=reading.gpus,
        nvidia_driver=reading.driver_version,
        gpu_note=reading.note,
    )


def default_threads(cpu: CPUInfo | None = None) -> int:
    """Threads for a compute-bound engine: one per physical core this process may use (``cpu``: read
    now when not given).

    Hyper-threads share a core's arithmetic units, so more threads than physical cores slow llama.cpp
    and ONNX Runtime down rather than up; a container pinned to some CPUs gets those.
    """
    return max(1, (cpu or read_cpus()).usable_physical)
