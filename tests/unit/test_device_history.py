"""The device history: the CPU meter's readings, each sample period kept for the doctor, and the gauge."""

from __future__ import annotations

import asyncio
import time
from collections import namedtuple
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lamina.compute import (
    CPUInfo,
    CpuMeter,
    CpuReading,
    GPUInfo,
    NodeInventory,
    publish_inventory,
    sample_devices_forever,
)
from lamina.observability import LAYER, DeviceMetrics, DeviceSample, Telemetry

GiB = 1 << 30
#: the fields of psutil.cpu_times() on Linux (seconds since boot, all CPUs)
Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")


class Kernel:
    """cpu_times() and a clock that the test moves."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.busy = 0.0
        self.idle = 0.0
        self.nice = 0.0

    def times(self) -> Times:
        # guest time is inside user time (as the kernel counts it): it must not count twice
        return Times(self.busy, self.nice, 0.0, self.idle, 0.0, 0.0, 0.0, 0.0, self.busy / 2, 0.0)

    def clock(self) -> float:
        return self.now

    def run(self, seconds: float, busy_share: float, cpus: int = 2) -> None:
        self.now += seconds
        self.busy += seconds * cpus * busy_share
        self.idle += seconds * cpus * (1 - busy_share)


def _reading(reading: CpuReading) -> tuple[float, float, Any]:
    return reading.start, reading.end, reading.percent


def test_the_meter_reads_the_busy_share_of_each_interval() -> None:
    kernel = Kernel()
    meter = CpuMeter(kernel.times, kernel.clock, niced_idle=True)
    kernel.run(15, 0.75)
    assert _reading(meter.read()) == (1_000.0, 1_015.0, pytest.approx(75.0))
    kernel.run(5, 0.1)
    peeked = meter.read(advance=False)  # the doctor's look since the last sample moves nothing
    assert _reading(peeked) == (1_015.0, 1_020.0, pytest.approx(10.0))
    kernel.run(5, 0.9)
    assert _reading(meter.read()) == (1_015.0, 1_025.0, pytest.approx(50.0))
    kernel.run(0.1, 1.0)  # too short for the kernel's 10 ms ticks: no figure, and the next covers it
    assert meter.read().percent is None
    kernel.run(1, 0.0)
    assert _reading(meter.read()) == (1_025.0, 1_026.1, pytest.approx(100 * 0.1 / 1.1))
    # a niced job on the idle cores (the job queue's run at nice 19) takes only what the rest leaves
    kernel.now += 10
    kernel.busy += 10 * 2 * 0.25
    kernel.nice += 10 * 2 * 0.75
    assert _reading(meter.read()) == (1_026.1, 1_036.1, pytest.approx(25.0))
    # a stack started under `nice` has its replicas' time there too: then niced time is busy
    niced_stack = CpuMeter(kernel.times, kernel.clock, niced_idle=False)
    kernel.now += 10
    kernel.nice += 10 * 2 * 0.5
    kernel.idle += 10 * 2 * 0.5
    assert niced_stack.read().percent == pytest.approx(50.0)


def test_the_meter_reads_this_machine() -> None:
    meter = CpuMeter()
    sum(i * i for i in range(2_000_000))  # some work, on one of its CPUs
    time.sleep(0.3)
    reading = meter.read()
    assert reading.percent is not None and 0.0 <= reading.percent <= 100.0
    assert reading.end - reading.start >= 0.25


def _node(gpus: tuple[GPUInfo, ...] = ()) -> NodeInventory:
    cpu = CPUInfo("test", 8, 8, tuple(range(8)), 8, (2.0, 1.0, 0.5))
    return NodeInventory("n1", cpu, 64 * GiB, 32 * GiB, gpus)


def test_each_sample_is_a_period_of_the_history_and_sets_the_gauge() -> None:
    registry = CollectorRegistry()
    metrics = DeviceMetrics(registry)
    publish_inventory(_node(), metrics)  # no reading (a caller of its own): gauges only
    assert list(metrics.history) == []
    gpus = (
        GPUInfo(0, "NVIDIA L4", "GPU-0", 24 * GiB, 4 * GiB, 90.0),
        GPUInfo(1, "NVIDIA L4", "GPU-1", 24 * GiB, 4 * GiB, 30.0),
        GPUInfo(2, "NVIDIA L4", "GPU-2", 24 * GiB, 4 * GiB, None),  # not read: not in the mean
    )
    publish_inventory(_node(gpus), metrics, CpuReading(10.0, 25.0, 62.5))
    assert list(metrics.history) == [DeviceSample(10.0, 25.0, 62.5, 60.0)]
    assert registry.get_sample_value("lamina_device_cpu_utilization_percent", {"node": "n1"}) == 62.5
    publish_inventory(_node(), metrics, CpuReading(25.0, 25.1, None))
    assert list(metrics.history)[-1] == DeviceSample(25.0, 25.1, None, None)
    assert registry.get_sample_value("lamina_device_cpu_utilization_percent", {"node": "n1"}) == 62.5
    assert metrics.history.maxlen == 5_760  # a day of 15 s periods, then the oldest go


@pytest.mark.anyio
async def test_the_cpu_figure_follows_the_first_sample_within_a_quarter_second() -> None:
    """The sampler starts moments after the stack made its meter: too short a reading for a figure. The
    next sample comes a quarter second later, not a whole period (15 s) later with the gauge left out."""
    registry = CollectorRegistry()
    metrics = DeviceMetrics(registry)
    task = asyncio.create_task(sample_devices_forever(metrics, every_s=3600, probe=_node, meter=CpuMeter()))
    try:
        deadline = time.monotonic() + 5
        while not metrics.history:
            assert time.monotonic() < deadline, "no sample in 5 s"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
    (first,) = metrics.history
    assert first.cpu_percent is not None and first.end - first.start >= 0.25
    assert registry.get_sample_value("lamina_device_cpu_utilization_percent", {"node": "n1"}) is not None


def test_the_compute_span_quotes_the_cpu_of_the_last_period_when_there_is_one() -> None:
    telemetry = Telemetry(service_name="t")
    devices = telemetry.devices
    devices.set_node("n1", load1=1.5, usable_cores=2, memory_total=8, memory_available=4)
    assert telemetry.device_span("chat")["lamina.device.utilization_pct"] == 75.0  # the load, at first
    devices.set_node(
        "n1", load1=1.5, usable_cores=2, memory_total=8, memory_available=4, utilization_pct=41.26
    )
    assert telemetry.device_span("chat") == {
        LAYER: "compute",
        "lamina.device.kind": "cpu",
        "lamina.device.node": "n1",
        "lamina.device.utilization_pct": 41.3,
    }
    telemetry.shutdown()
