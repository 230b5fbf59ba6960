"""The device inventory, will-it-fit and device telemetry.

CPUs and memory are this machine's real readings. GPUs are read through a double of nvidia-ml-py's
``pynvml`` module: the same function names, constants and (real) exception classes, over made-up devices,
so every NVML call the reader makes is exercised as it would be against the library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pynvml
import pytest
from prometheus_client import CollectorRegistry

from lamina.compute import (
    CPUInfo,
    GPUInfo,
    GPULink,
    GPUProcess,
    MemoryEstimate,
    MigInstance,
    NodeInventory,
    core_cpus,
    default_threads,
    fit,
    physical_cores_of,
    probe_inventory,
    publish_inventory,
    read_gpus,
    sample_devices_forever,
)
from lamina.errors import ConfigError
from lamina.models import GGUFOptions, engine_descriptor
from lamina.observability import DeviceMetrics
from lamina.stack import ReplicaNeed, check_fit

GiB = 1024**3


@dataclass
class FakeGPU:
    name: str
    uuid: str
    total: int
    used: int
    utilization: int | None = 10
    temperature: int | None = 40
    power_mw: int | None = 250_000
    limit_mw: int | None = 700_000
    bus_id: bytes = b"00000000:01:00.0"
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    #: MIG slots: None is an empty slot; (uuid, total, used) a MIG device
    mig: list[tuple[str, int, int] | None] | None = None
    #: active flag per NVLink; None: the board has no NVLink
    nvlinks: list[int] | None = None
    pcie: tuple[int, int] | None = (5, 16)
    lost: bool = False


def _raise(error: type[pynvml.NVMLError]) -> Any:
    raise error()


class FakePynvml:
    """nvidia-ml-py's interface over FakeGPUs; records init and shutdown calls."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    NVML_NVLINK_MAX_LINKS = pynvml.NVML_NVLINK_MAX_LINKS

    def __init__(self, gpus: list[FakeGPU], *, driver: bool = True, count_fails: bool = False) -> None:
        self.gpus, self.driver, self.count_fails = gpus, driver, count_fails
        self.inits = self.shutdowns = 0

    def nvmlInit(self) -> None:
        if not self.driver:
            _raise(pynvml.NVMLError_LibraryNotFound)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "570.124.06"

    def nvmlDeviceGetCount(self) -> int:
        if self.count_fails:
            _raise(pynvml.NVMLError_Unknown)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGPU:
        gpu = self.gpus[index]
        return _raise(pynvml.NVMLError_GpuIsLost) if gpu.lost else gpu

    def nvmlDeviceGetName(self, gpu: FakeGPU) -> str:
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: FakeGPU | SimpleNamespace) -> str:
        return str(gpu.uuid)

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGPU | SimpleNamespace) -> SimpleNamespace:
        return SimpleNamespace(total=gpu.total, used=gpu.used, free=gpu.total - gpu.used)

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGPU) -> SimpleNamespace:
        if gpu.utilization is None:
            _raise(pynvml.NVMLError_NotSupported)
        return SimpleNamespace(gpu=gpu.utilization, memory=0)

    def nvmlDeviceGetTemperature(self, gpu: FakeGPU, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return gpu.temperature if gpu.temperature is not None else _raise(pynvml.NVMLError_NotSupported)

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGPU) -> int:
        return gpu.power_mw if gpu.power_mw is not None else _raise(pynvml.NVMLError_NotSupported)

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu: FakeGPU) -> int:
        return gpu.limit_mw if gpu.limit_mw is not None else _raise(pynvml.NVMLError_NoPermission)

    def nvmlDeviceGetPciInfo(self, gpu: FakeGPU) -> SimpleNamespace:
        return SimpleNamespace(busId=gpu.bus_id)

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGPU) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes]

    def nvmlDeviceGetMigMode(self, gpu: FakeGPU) -> list[int]:
        if gpu.mig is None:
            _raise(pynvml.NVMLError_NotSupported)
        return [pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE]

    def nvmlDeviceGetMaxMigDeviceCount(self, gpu: FakeGPU) -> int:
        return len(gpu.mig or [])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, gpu: FakeGPU, index: int) -> SimpleNamespace:
        slot = (gpu.mig or [])[index]
        if slot is None:
            _raise(pynvml.NVMLError_NotFound)
        assert slot is not None
        return SimpleNamespace(uuid=slot[0], total=slot[1], used=slot[2])

    def nvmlDeviceGetCurrPcieLinkGeneration(self, gpu: FakeGPU) -> int:
        return gpu.pcie[0] if gpu.pcie else _raise(pynvml.NVMLError_NotSupported)

    def nvmlDeviceGetCurrPcieLinkWidth(self, gpu: FakeGPU) -> int:
        return gpu.pcie[1] if gpu.pcie else _raise(pynvml.NVMLError_NotSupported)

    def nvmlDeviceGetNvLinkState(self, gpu: FakeGPU, link: int) -> int:
        if gpu.nvlinks is None:
            _raise(pynvml.NVMLError_NotSupported)
        assert gpu.nvlinks is not None
        return gpu.nvlinks[link] if link < len(gpu.nvlinks) else _raise(pynvml.NVMLError_InvalidArgument)

    def nvmlDeviceGetNvLinkRemotePciInfo(self, gpu: FakeGPU, link: int) -> SimpleNamespace:
        return SimpleNamespace(busId=f"00000000:{link + 0x10:02X}:00.0".encode())


H100 = FakeGPU(
    "NVIDIA H100 80GB HBM3",
    "GPU-aaaa",
    80 * GiB,
    2 * GiB,
    utilization=37,
    processes=[(4242, GiB), (4343, None)],
    nvlinks=[1, 1, 0],
)


def test_gpus_are_read_with_every_reading_nvml_gives() -> None:
    nvml = FakePynvml([H100])
    reading = read_gpus(nvml)
    assert reading.driver_version == "570.124.06" and reading.note is None
    assert reading.gpus == (
        GPUInfo(
            index=0,
            name="NVIDIA H100 80GB HBM3",
            uuid="GPU-aaaa",
            memory_total_bytes=80 * GiB,
            memory_used_bytes=2 * GiB,
            utilization_pct=37.0,
            temperature_c=40.0,
            power_w=250.0,
            power_limit_w=700.0,
            pci_bus_id="00000000:01:00.0",
            processes=(GPUProcess(4242, GiB), GPUProcess(4343, None)),
            links=(
                GPULink("pcie", generation=5, width=16),
                GPULink("nvlink", link=0, remote_bus_id="00000000:10:00.0"),
                GPULink("nvlink", link=1, remote_bus_id="00000000:11:00.0"),
            ),
        ),
    )
    assert reading.gpus[0].memory_free_bytes == 78 * GiB
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_readings_a_board_does_not_support_are_none() -> None:
    l4 = FakeGPU("NVIDIA L4", "GPU-bbbb", 24 * GiB, 0, None, None, None, None, pcie=None)
    (gpu,) = read_gpus(FakePynvml([l4])).gpus
    assert (gpu.utilization_pct, gpu.temperature_c, gpu.power_w, gpu.power_limit_w) == (None,) * 4
    assert gpu.links == () and gpu.processes == () and not gpu.mig_enabled


def test_mig_instances_are_listed_and_empty_slots_skipped() -> None:
    a100 = FakeGPU(
        "NVIDIA A100-SXM4-40GB",
        "GPU-cccc",
        40 * GiB,
        GiB,
        mig=[("MIG-1111", 10 * GiB, GiB), None, ("MIG-2222", 20 * GiB, 0)],
    )
    (gpu,) = read_gpus(FakePynvml([a100])).gpus
    assert gpu.mig_enabled
    assert gpu.mig == (MigInstance(0, "MIG-1111", 10 * GiB, GiB), MigInstance(2, "MIG-2222", 20 * GiB, 0))


def test_a_lost_gpu_is_left_out_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    lost = FakeGPU("A", "GPU-lost", GiB, 0, lost=True)
    with caplog.at_level(logging.WARNING, logger="lamina.compute._gpus"):
        reading = read_gpus(FakePynvml([lost, H100]))
    assert [(g.index, g.uuid) for g in reading.gpus] == [(1, "GPU-aaaa")]
    assert "GPU 0 left out of the inventory: nvmlDeviceGetHandleByIndex: GPU is lost" in caplog.text


def test_a_failing_session_yields_no_gpus_with_a_note_and_is_shut_down() -> None:
    nvml = FakePynvml([H100], count_fails=True)
    reading = read_gpus(nvml)
    assert reading.gpus == () and reading.note is not None and "Unknown Error" in reading.note
    assert nvml.shutdowns == 1


def test_no_driver_is_a_normal_state_with_a_note() -> None:
    nvml = FakePynvml([H100], driver=False)
    reading = read_gpus(nvml)
    assert reading == read_gpus(nvml)
    assert reading.gpus == () and reading.note == "no NVIDIA driver (NVML Shared Library Not Found)"
    assert nvml.shutdowns == 0, "a session that never opened is not shut down"


def test_this_machine_is_read_for_real() -> None:
    inv = probe_inventory()
    assert inv.hostname == socket.gethostname()
    assert inv.cpu.logical == psutil.cpu_count(logical=True)
    assert inv.cpu.affinity == tuple(sorted(os.sched_getaffinity(0)))
    assert 1 <= inv.cpu.usable_physical <= min(inv.cpu.physical, inv.cpu.usable)
    assert inv.cpu.model and len(inv.cpu.load_avg) == 3
    assert 0 < inv.memory_available_bytes <= inv.memory_total_bytes == psutil.virtual_memory().total
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        assert inv.gpus == () and inv.gpu_note is not None and inv.gpu_note.startswith("no NVIDIA driver")
    else:
        pynvml.nvmlShutdown()
        assert all(g.memory_total_bytes > 0 and g.uuid for g in inv.gpus)


def _sysfs(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    """A /sys/devices/system/cpu tree: logical CPU -> (package, core)."""
    for cpu, (package, core) in cores.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_under_a_mask_count_hyperthread_siblings_once(tmp_path: Path) -> None:
    # 2 sockets x 2 cores x 2 threads; Linux numbers siblings apart (cpu0 and cpu4 share a core)
    layout = {cpu: (cpu // 2 % 2, cpu % 2) for cpu in range(8)}
    sysfs = _sysfs(tmp_path, layout)
    assert physical_cores_of(range(8), sysfs) == 4
    assert physical_cores_of([0, 4], sysfs) == 1  # one core's two threads
    assert physical_cores_of([0, 1, 2, 3], sysfs) == 4
    assert physical_cores_of([0, 9], sysfs) is None  # no topology for cpu9: unknown, not guessed


def test_threads_are_pinned_one_to_a_core_never_to_a_hyperthread_sibling(tmp_path: Path) -> None:
    layout = {cpu: (cpu // 2 % 2, cpu % 2) for cpu in range(8)}  # cpu0 and cpu4 share a core, ...
    sysfs = _sysfs(tmp_path, layout)
    assert core_cpus(range(8), sysfs) == [0, 1, 2, 3]
    assert core_cpus([5, 4, 0], sysfs) == [0, 5]  # cpu4 is cpu0's sibling
    assert core_cpus([3, 9, 1], sysfs) == [1, 3, 9]  # no topology for cpu9: the CPUs as they are


def _cpu(usable_physical: int) -> CPUInfo:
    return CPUInfo("test", 8, 16, tuple(range(16)), usable_physical)


@pytest.mark.parametrize(("usable", "threads"), [(8, 8), (4, 4), (1, 1), (0, 1)])
def test_default_threads_is_the_usable_physical_cores(usable: int, threads: int) -> None:
    assert default_threads(_cpu(usable)) == threads


def test_engines_take_their_thread_default_from_the_compute_layer(tmp_path: Path) -> None:
    """The gguf engine's replica asks for as many CPUs as the usable physical cores of this machine."""
    model = tmp_path / "none.gguf"
    resources = engine_descriptor("gguf").resources([model], GGUFOptions())
    assert resources.cpus == default_threads() == probe_inventory().cpu.usable_physical


def _node(available: int, gpus: tuple[GPUInfo, ...] = (), name: str = "n1") -> NodeInventory:
    return NodeInventory(name, _cpu(8), 64 * GiB, available, gpus)


def _gpu(index: int, total_gib: int, used_gib: int) -> GPUInfo:
    return GPUInfo(index, "NVIDIA L40S", f"GPU-{index}", total_gib * GiB, used_gib * GiB)


def test_fit_counts_replicas_in_ram_over_nodes() -> None:
    estimate = MemoryEstimate(weights_bytes=GiB, runtime_bytes=GiB, kv_cache_bytes=2 * GiB)
    report = fit(estimate, [_node(10 * GiB), _node(9 * GiB, name="n2")], replicas=4)
    assert [d.replicas for d in report.devices] == [2, 2] and report.replicas_possible == 4 and report.fits
    no = fit(estimate, [_node(10 * GiB)], replicas=3)
    assert not no.fits
    text = no.explain("chat")
    assert text.startswith("chat: 3 replica(s) x 4.00 GiB (weights 1.00 GiB + KV cache 2.00 GiB + runtime")
    assert "2 fit now (10.00 GiB available on n1 RAM)" in text
    assert "smaller context (n_ctx), fewer parallel slots" in text and "quantisation" in text


def test_fit_on_gpus_splits_a_replica_over_distinct_gpus_of_one_node() -> None:
    estimate = MemoryEstimate(weights_bytes=30 * GiB, runtime_bytes=10 * GiB)
    gpus = (_gpu(0, 48, 0), _gpu(1, 48, 20), _gpu(2, 48, 40))
    one_gpu = fit(estimate, [_node(8 * GiB, gpus)], gpus=1)
    assert [d.replicas for d in one_gpu.devices] == [1, 0, 0] and one_gpu.replicas_possible == 1
    # two whole GPUs with 20 GiB free each: GPU0 and GPU1 qualify, GPU2 does not -> one pair only
    two_gpus = fit(estimate, [_node(8 * GiB, gpus)], gpus=2, replicas=2)
    assert [d.replicas for d in two_gpus.devices] == [1, 1, 0]
    assert two_gpus.replicas_possible == 1 and not two_gpus.fits
    assert fit(estimate, [_node(64 * GiB)], gpus=1).replicas_possible == 0, "RAM does not stand in for a GPU"


def _need(name: str, gib: int, replicas: int) -> ReplicaNeed:
    return ReplicaNeed(name, MemoryEstimate(weights_bytes=gib * GiB, runtime_bytes=0), 0, replicas)


def test_deployments_that_fit_alone_but_not_together_are_refused_with_the_numbers() -> None:
    nodes = [_node(10 * GiB)]
    check_fit([_need("chat", 4, 2), _need("embed", 1, 2)], nodes)
    with pytest.raises(ConfigError) as caught:
        check_fit([_need("chat", 4, 2), _need("big", 3, 1)], nodes)
    message = caught.value.message
    assert message.startswith("deployment 'big' does not fit on this machine, so nothing was started")
    assert "it would fit alone, but not beside chat" in message
    with pytest.raises(ConfigError, match=r"2 replica\(s\) x 6.00 GiB .* 1 fit now .* fewer parallel slots"):
        check_fit([_need("huge", 6, 2)], nodes)


def test_gpu_deployments_share_a_gpu_by_memory_and_take_several_whole() -> None:
    nodes = [_node(64 * GiB, (_gpu(0, 24, 0), _gpu(1, 24, 0)))]
    small = MemoryEstimate(weights_bytes=10 * GiB, runtime_bytes=0)
    check_fit([ReplicaNeed("a", small, 1, 4)], nodes)  # two per GPU
    with pytest.raises(ConfigError, match=r"5 replica\(s\) x 10.00 GiB .* in 1 GPU\(s\) of one node; 4 fit"):
        check_fit([ReplicaNeed("a", small, 1, 5)], nodes)
    check_fit([ReplicaNeed("tp", small, 2, 1)], nodes)
    with pytest.raises(ConfigError, match="not beside a"):  # GPU 1 holds a share: no two whole GPUs left
        check_fit([ReplicaNeed("a", small, 1, 1), ReplicaNeed("tp", small, 2, 1)], nodes)


def test_device_gauges_follow_the_inventory() -> None:
    registry = CollectorRegistry()
    metrics = DeviceMetrics(registry)
    gpu = GPUInfo(0, "NVIDIA L4", "GPU-x", 24 * GiB, 4 * GiB, 55.0, 61.0, 70.5)
    publish_inventory(_node(10 * GiB, (gpu,)), metrics)
    labels = {"node": "n1", "gpu": "0", "uuid": "GPU-x", "model_name": "NVIDIA L4"}
    value = registry.get_sample_value
    assert value("lamina_device_gpu_utilization_percent", labels) == 55.0
    assert value("lamina_device_gpu_memory_free_bytes", labels) == 20 * GiB
    assert value("lamina_device_gpu_temperature_celsius", labels) == 61.0
    assert value("lamina_device_gpu_power_watts", labels) == 70.5
    assert value("lamina_device_memory_available_bytes", {"node": "n1"}) == 10 * GiB
    assert value("lamina_device_cpu_usable_cores", {"node": "n1"}) == 8
    publish_inventory(_node(9 * GiB), metrics)  # the GPU is gone: its series go with it
    assert value("lamina_device_gpu_memory_used_bytes", labels) is None
    assert value("lamina_device_memory_available_bytes", {"node": "n1"}) == 9 * GiB


@pytest.mark.anyio
async def test_sampling_goes_on_after_a_failed_sample(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    samples: list[int] = []
    done = asyncio.Event()

    def probe() -> NodeInventory:
        samples.append(len(samples))
        if len(samples) == 1:
            raise RuntimeError("NVML went away")
        done.set()
        return _node(5 * GiB)

    with caplog.at_level(logging.ERROR, logger="lamina.compute._telemetry"):
        task = asyncio.create_task(
            sample_devices_forever(DeviceMetrics(registry), every_s=0.001, probe=probe)
        )
        await asyncio.wait_for(done.wait(), timeout=10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert "device telemetry: a sample failed" in caplog.text
    assert registry.get_sample_value("lamina_device_memory_available_bytes", {"node": "n1"}) == 5 * GiB
