"""What this machine has: CPU cores, memory and NVIDIA GPUs (through NVML), read once into a frozen record.

CPUs and memory come from psutil. GPUs come from NVML behind :class:`NVMLProbe`, a small seam that the
real :class:`PynvmlProbe` (nvidia-ml-py) implements and a test can fake. A machine without an NVIDIA
driver (or a device that cannot be read) yields fewer GPUs, never an exception: the stack must start on
any machine.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psutil
import pynvml

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class GPUInfo:
    """One NVIDIA GPU as NVML reports it at probe time."""

    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    #: percent of the last sample period a kernel ran; None where the device does not report it
    utilization_pct: float | None

    @property
    def memory_free_bytes(self) -> int:
        return max(self.memory_total_bytes - self.memory_used_bytes, 0)


@dataclass(frozen=True)
class NodeInventory:
    """This machine's compute, as placement and thread defaults need it."""

    hostname: str
    cpu_physical: int
    cpu_logical: int
    #: logical CPUs this process may run on (its affinity mask; fewer than cpu_logical in a pinned container)
    cpu_usable: int
    memory_total_bytes: int
    memory_available_bytes: int
    gpus: tuple[GPUInfo, ...] = ()


class GPUProbeError(Exception):
    """A probe could not read a device; the inventory leaves that device (or all GPUs) out."""


class NVMLProbe(Protocol):
    """The few NVML readings the inventory needs, by device index."""

    def open(self) -> bool:
        """Start a session; False when there is no NVIDIA driver or library here."""
        ...

    def close(self) -> None: ...
    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def uuid(self, index: int) -> str: ...
    def memory(self, index: int) -> tuple[int, int]:
        """(total, used) bytes."""
        ...

    def utilization_pct(self, index: int) -> float | None: ...


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


class PynvmlProbe:
    """NVML through nvidia-ml-py; every NVML failure becomes a GPUProbeError."""

    def open(self) -> bool:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            log.debug("no NVIDIA GPUs: NVML unavailable (%s)", exc)
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()

    @staticmethod
    def _read(fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except pynvml.NVMLError as exc:
            raise GPUProbeError(f"{fn.__name__}: {exc}") from exc

    def _handle(self, index: int) -> Any:
        return self._read(pynvml.nvmlDeviceGetHandleByIndex, index)

    def device_count(self) -> int:
        return int(self._read(pynvml.nvmlDeviceGetCount))

    def name(self, index: int) -> str:
        return _text(self._read(pynvml.nvmlDeviceGetName, self._handle(index)))

    def uuid(self, index: int) -> str:
        return _text(self._read(pynvml.nvmlDeviceGetUUID, self._handle(index)))

    def memory(self, index: int) -> tuple[int, int]:
        info = self._read(pynvml.nvmlDeviceGetMemoryInfo, self._handle(index))
        return int(info.total), int(info.used)

    def utilization_pct(self, index: int) -> float | None:
        handle = self._handle(index)
        try:
            return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except pynvml.NVMLError_NotSupported:
            return None
        except pynvml.NVMLError as exc:
            raise GPUProbeError(f"nvmlDeviceGetUtilizationRates: {exc}") from exc


def _read_gpu(probe: NVMLProbe, index: int) -> GPUInfo:
    total, used = probe.memory(index)
    return GPUInfo(
        index=index,
        name=probe.name(index),
        uuid=probe.uuid(index),
        memory_total_bytes=total,
        memory_used_bytes=used,
        utilization_pct=probe.utilization_pct(index),
    )


def probe_gpus(probe: NVMLProbe) -> tuple[GPUInfo, ...]:
    """Every GPU the probe can read; a device that fails is logged and left out."""
    if not probe.open():
        return ()
    try:
        count = probe.device_count()
        gpus: list[GPUInfo] = []
        for index in range(count):
            try:
                gpus.append(_read_gpu(probe, index))
            except GPUProbeError as exc:
                log.warning("GPU %d left out of the inventory: %s; check `nvidia-smi`", index, exc)
        return tuple(gpus)
    except GPUProbeError as exc:
        log.warning("GPUs left out of the inventory: %s; check `nvidia-smi`", exc)
        return ()
    finally:
        probe.close()


def _usable_cpus(logical: int) -> int:
    try:
        return len(psutil.Process().cpu_affinity() or []) or logical
    except (AttributeError, psutil.Error):  # no cpu_affinity on macOS
        return logical


def probe_inventory(nvml: NVMLProbe | None = None) -> NodeInventory:
    """Read this machine's CPUs, memory and GPUs (``nvml``: the GPU probe, NVML itself by default)."""
    logical = psutil.cpu_count(logical=True) or 1
    memory = psutil.virtual_memory()
    return NodeInventory(
        hostname=socket.gethostname(),
        cpu_physical=psutil.cpu_count(logical=False) or logical,
        cpu_logical=logical,
        cpu_usable=_usable_cpus(logical),
        memory_total_bytes=int(memory.total),
        memory_available_bytes=int(memory.available),
        gpus=probe_gpus(nvml if nvml is not None else PynvmlProbe()),
    )


def default_threads(inventory: NodeInventory) -> int:
    """Threads for a compute-bound engine: one per physical core this process may use.

    Hyper-threads share a core's arithmetic units, so more threads than physical cores slow llama.cpp
    and ONNX Runtime down rather than up.
    """
    return max(1, min(inventory.cpu_physical, inventory.cpu_usable))
