"""The device inventory: real psutil readings, GPUs through a fake NVML probe that implements NVMLProbe."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

import psutil
import pytest

from lamina.compute import (
    GPUInfo,
    GPUProbeError,
    NodeInventory,
    NVMLProbe,
    PynvmlProbe,
    default_threads,
    probe_inventory,
)

GiB = 1024**3


@dataclass
class FakeDevice:
    name: str
    uuid: str
    total: int
    used: int
    utilization: float | None = 0.0
    broken: bool = False


@dataclass
class FakeNVML:
    """An NVML session over made-up devices, recording that it was opened and closed."""

    devices: list[FakeDevice] = field(default_factory=list)
    driver: bool = True
    opened: int = 0
    closed: int = 0
    count_fails: bool = False

    def open(self) -> bool:
        self.opened += 1
        return self.driver

    def close(self) -> None:
        self.closed += 1

    def device_count(self) -> int:
        if self.count_fails:
            raise GPUProbeError("nvmlDeviceGetCount: Unknown Error")
        return len(self.devices)

    def _device(self, index: int) -> FakeDevice:
        device = self.devices[index]
        if device.broken:
            raise GPUProbeError("nvmlDeviceGetHandleByIndex: GPU is lost")
        return device

    def name(self, index: int) -> str:
        return self._device(index).name

    def uuid(self, index: int) -> str:
        return self._device(index).uuid

    def memory(self, index: int) -> tuple[int, int]:
        d = self._device(index)
        return d.total, d.used

    def utilization_pct(self, index: int) -> float | None:
        return self._device(index).utilization


def _probe(fake: NVMLProbe) -> NodeInventory:
    return probe_inventory(nvml=fake)


def test_cpus_and_memory_come_from_this_machine() -> None:
    inv = probe_inventory(nvml=FakeNVML(driver=False))
    assert inv.hostname == socket.gethostname()
    assert inv.cpu_logical == psutil.cpu_count(logical=True)
    assert 1 <= inv.cpu_physical <= inv.cpu_logical
    assert 1 <= inv.cpu_usable <= inv.cpu_logical
    assert inv.memory_total_bytes == psutil.virtual_memory().total
    assert 0 < inv.memory_available_bytes <= inv.memory_total_bytes
    assert inv.gpus == ()


def test_gpus_are_read_from_the_probe_and_the_session_closed() -> None:
    fake = FakeNVML(
        [
            FakeDevice("NVIDIA H100 80GB HBM3", "GPU-aaaa", 80 * GiB, 2 * GiB, 37.0),
            FakeDevice("NVIDIA L4", "GPU-bbbb", 24 * GiB, 0, None),
        ]
    )
    inv = _probe(fake)
    assert inv.gpus == (
        GPUInfo(0, "NVIDIA H100 80GB HBM3", "GPU-aaaa", 80 * GiB, 2 * GiB, 37.0),
        GPUInfo(1, "NVIDIA L4", "GPU-bbbb", 24 * GiB, 0, None),
    )
    assert inv.gpus[0].memory_free_bytes == 78 * GiB
    assert (fake.opened, fake.closed) == (1, 1)


def test_a_device_that_cannot_be_read_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNVML(
        [FakeDevice("A", "GPU-a", GiB, 0, broken=True), FakeDevice("B", "GPU-b", 2 * GiB, GiB, 5.0)]
    )
    with caplog.at_level(logging.WARNING, logger="lamina.compute._devices"):
        inv = _probe(fake)
    assert [g.uuid for g in inv.gpus] == ["GPU-b"]
    assert inv.gpus[0].index == 1
    assert "GPU 0 left out of the inventory: nvmlDeviceGetHandleByIndex: GPU is lost" in caplog.text


def test_a_failing_nvml_session_yields_no_gpus_but_is_closed() -> None:
    fake = FakeNVML([FakeDevice("A", "GPU-a", GiB, 0)], count_fails=True)
    assert _probe(fake).gpus == ()
    assert fake.closed == 1


def test_no_driver_means_no_gpus_and_no_exception() -> None:
    fake = FakeNVML([FakeDevice("A", "GPU-a", GiB, 0)], driver=False)
    assert _probe(fake).gpus == ()
    assert fake.closed == 0, "a session that never opened is not closed"


def test_the_real_nvml_probe_on_this_machine_never_raises() -> None:
    """On a machine without an NVIDIA driver this is an empty list; with one, real devices."""
    gpus = probe_inventory().gpus
    assert all(g.memory_total_bytes > 0 and g.uuid for g in gpus)
    probe = PynvmlProbe()
    if probe.open():
        probe.close()
    else:
        assert gpus == ()


def _inventory(physical: int, logical: int, usable: int) -> NodeInventory:
    return NodeInventory("h", physical, logical, usable, 8 * GiB, 4 * GiB)


@pytest.mark.parametrize(
    ("physical", "logical", "usable", "expected"),
    [
        (2, 2, 2, 2),
        (8, 16, 16, 8),  # hyper-threads do not count
        (8, 16, 4, 4),  # a pinned container gets what it may use
        (1, 1, 1, 1),
        (0, 0, 0, 1),  # never zero threads
    ],
)
def test_default_threads_is_the_usable_physical_cores(
    physical: int, logical: int, usable: int, expected: int
) -> None:
    assert default_threads(_inventory(physical, logical, usable)) == expected
