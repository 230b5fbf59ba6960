"""NVIDIA GPUs as NVML reports them, read through nvidia-ml-py's ``pynvml`` module.

The module is a parameter (``pynvml`` itself by default), so a test hands in an object with the same
functions, constants and exception classes: a double of the library's real interface, which exercises
every call this reader makes. A machine with no NVIDIA driver (or no ``libnvidia-ml``) is a normal state:
:func:`read_gpus` says so in :attr:`GPUReading.note` and returns no GPUs, never an exception.

A reading that a device does not support (temperature on some boards, power on MIG slices, NVLink on a
PCIe card) is None or empty; a device whose name, UUID or memory cannot be read is left out and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pynvml

log = logging.getLogger(__name__)

T = TypeVar("T")
_MW_PER_W = 1000.0


@dataclass(frozen=True)
class GPUProcess:
    """A process with a compute context on a GPU."""

    pid: int
    #: None where the driver does not say (Windows WDDM, or no permission)
    used_memory_bytes: int | None


@dataclass(frozen=True)
class MigInstance:
    """One MIG device (a slice of a GPU with its own memory)."""

    index: int
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int


@dataclass(frozen=True)
class GPULink:
    """How a GPU is connected: its PCIe link to the host, or one active NVLink to a peer."""

    kind: Literal["pcie", "nvlink"]
    #: NVLink: the link's number on this GPU; PCIe: None
    link: int | None = None
    #: NVLink: the PCI bus id of the device at the other end
    remote_bus_id: str | None = None
    #: PCIe: the current generation and lane width
    generation: int | None = None
    width: int | None = None


@dataclass(frozen=True)
class GPUInfo:
    """One NVIDIA GPU as NVML reports it at probe time."""

    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    #: percent of the last sample period a kernel ran; None where the device does not report it
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    pci_bus_id: str | None = None
    processes: tuple[GPUProcess, ...] = ()
    mig_enabled: bool = False
    mig: tuple[MigInstance, ...] = ()
    links: tuple[GPULink, ...] = ()

    @property
    def memory_free_bytes(self) -> int:
        return max(self.memory_total_bytes - self.memory_used_bytes, 0)


@dataclass(frozen=True)
class GPUReading:
    """What NVML said: the GPUs, the driver version, and why there are none when there are none."""

    gpus: tuple[GPUInfo, ...] = ()
    driver_version: str | None = None
    #: None when NVML answered; else why not ("no NVIDIA driver (...)"), for people to read
    note: str | None = None


class GPUProbeError(Exception):
    """A required reading of a device failed; the inventory leaves that device (or all GPUs) out."""


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class _Reader:
    """One NVML session's readings; required ones raise GPUProbeError, optional ones give None."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml

    def required(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except self.nvml.NVMLError as exc:
            raise GPUProbeError(f"{getattr(fn, '__name__', fn)}: {exc}") from exc

    def optional(self, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return fn(*args)
        except self.nvml.NVMLError as exc:
            log.debug("%s not available: %s", getattr(fn, "__name__", fn), exc)
            return None

    def gpu(self, index: int) -> GPUInfo:
        nv = self.nvml
        handle = self.required(nv.nvmlDeviceGetHandleByIndex, index)
        memory = self.required(nv.nvmlDeviceGetMemoryInfo, handle)
        utilization = self.optional(nv.nvmlDeviceGetUtilizationRates, handle)
        temperature = self.optional(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU)
        power_mw = self.optional(nv.nvmlDeviceGetPowerUsage, handle)
        limit_mw = self.optional(nv.nvmlDeviceGetEnforcedPowerLimit, handle)
        pci = self.optional(nv.nvmlDeviceGetPciInfo, handle)
        mig_mode = self.optional(nv.nvmlDeviceGetMigMode, handle)
        mig_enabled = mig_mode is not None and mig_mode[0] == nv.NVML_DEVICE_MIG_ENABLE
        return GPUInfo(
            index=index,
            name=_text(self.required(nv.nvmlDeviceGetName, handle)),
            uuid=_text(self.required(nv.nvmlDeviceGetUUID, handle)),
            memory_total_bytes=int(memory.total),
            memory_used_bytes=int(memory.used),
            utilization_pct=None if utilization is None else float(utilization.gpu),
            temperature_c=None if temperature is None else float(temperature),
            power_w=None if power_mw is None else power_mw / _MW_PER_W,
            power_limit_w=None if limit_mw is None else limit_mw / _MW_PER_W,
            pci_bus_id=None if pci is None else _text(pci.busId),
            processes=self.processes(handle),
            mig_enabled=mig_enabled,
            mig=self.mig(handle) if mig_enabled else (),
            links=self.links(handle),
        )

    def processes(self, handle: Any) -> tuple[GPUProcess, ...]:
        found = self.optional(self.nvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
        return tuple(
            GPUProcess(int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory)) for p in found
        )

    def mig(self, handle: Any) -> tuple[MigInstance, ...]:
        nv = self.nvml
        instances: list[MigInstance] = []
        for slot in range(self.optional(nv.nvmlDeviceGetMaxMigDeviceCount, handle) or 0):
            mig = self.optional(nv.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot)
            if mig is None:  # NVML_ERROR_NOT_FOUND: no MIG device in this slot
                continue
            uuid = self.optional(nv.nvmlDeviceGetUUID, mig)
            memory = self.optional(nv.nvmlDeviceGetMemoryInfo, mig)
            if uuid is None or memory is None:
                continue
            instances.append(MigInstance(slot, _text(uuid), int(memory.total), int(memory.used)))
        return tuple(instances)

    def links(self, handle: Any) -> tuple[GPULink, ...]:
        nv = self.nvml
        generation = self.optional(nv.nvmlDeviceGetCurrPcieLinkGeneration, handle)
        width = self.optional(nv.nvmlDeviceGetCurrPcieLinkWidth, handle)
        links = [GPULink("pcie", generation=generation, width=width)] if generation or width else []
        for link in range(nv.NVML_NVLINK_MAX_LINKS):
            try:
                active = nv.nvmlDeviceGetNvLinkState(handle, link)
            except nv.NVMLError:  # not supported, or past this GPU's last link
                break
            if active:
                remote = self.optional(nv.nvmlDeviceGetNvLinkRemotePciInfo, handle, link)
                bus = None if remote is None else _text(remote.busId)
                links.append(GPULink("nvlink", link=link, remote_bus_id=bus))
        return tuple(links)


def read_gpus(nvml: Any = pynvml) -> GPUReading:
    """Every GPU NVML can read. ``nvml``: the ``pynvml`` module, or an object with its interface.

    No driver is a reading with a note, not an error; a device that fails is logged and left out."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        log.debug("no NVIDIA GPUs: NVML unavailable (%s)", exc)
        return GPUReading(note=f"no NVIDIA driver ({exc})")
    reader = _Reader(nvml)
    try:
        driver = reader.optional(nvml.nvmlSystemGetDriverVersion)
        count = int(reader.required(nvml.nvmlDeviceGetCount))
        gpus: list[GPUInfo] = []
        for index in range(count):
            try:
                gpus.append(reader.gpu(index))
            except GPUProbeError as exc:
                log.warning("GPU %d left out of the inventory: %s; check `nvidia-smi`", index, exc)
        note = (
            "the NVIDIA driver sees no GPUs"
            if count == 0
            else None
            if gpus
            else f"{count} GPUs found, none readable; check `nvidia-smi`"
        )
        return GPUReading(tuple(gpus), None if driver is None else _text(driver), note)
    except GPUProbeError as exc:
        log.warning("GPUs left out of the inventory: %s; check `nvidia-smi`", exc)
        return GPUReading(note=f"NVML failed: {exc}; check `nvidia-smi`")
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)
