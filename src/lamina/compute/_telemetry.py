"""Device telemetry: the inventory sampled in the background and exported as ``lamina_device_*`` gauges.

:func:`publish_inventory` turns one inventory into gauge values and one point of the utilisation history
(the doctor reads the CPU and GPUs of the time its requests ran from it); :func:`sample_devices_forever`
is the loop the gateway's process runs (NVML and psutil block, so each sample runs in a worker thread). A
sample that fails is logged and the loop goes on: telemetry never takes the gateway down.

The node's CPU utilisation is a :class:`CpuMeter` reading: the busy share of the kernel's CPU time
between two samples (the whole interval, not an instant), from cumulative counters, so no other caller
of ``psutil.cpu_percent`` moves its baseline. Time the kernel gave to niced processes (the job queue's
jobs run at nice 19) is not busy: they take only what everything else leaves, so the CPU they use is free
for the gateway and its replicas, and a batch job on idle cores does not read as a saturated machine
(unless the meter's own process runs niced: then the replicas' time is there too).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import psutil

from lamina.compute._devices import NodeInventory, probe_inventory

if TYPE_CHECKING:  # the gauges are handed in; importing compute must not load the metrics stack
    from lamina.observability import DeviceMetrics

log = logging.getLogger(__name__)

#: seconds between samples: DCGM's default field update interval is 30 s; Prometheus scrapes at 15-60 s
DEFAULT_SAMPLE_INTERVAL_S = 15.0
#: the shortest interval a CPU reading is made over (the kernel counts CPU time in 10 ms ticks)
MIN_READING_S = 0.25


class CpuReading(NamedTuple):
    """The node's CPU between two readings: epoch seconds, and the busy percent of all its CPUs' time
    (None: too short an interval to say)."""

    start: float
    end: float
    percent: float | None


def _busy_and_total(times: Any, niced_idle: bool) -> tuple[float, float]:
    """psutil's split (``cpu_percent``: guest time is inside user time; idle and iowait are idle), with
    niced time taken as idle too when ``niced_idle`` (see the module doc)."""
    fields = times._asdict()
    total = sum(fields.values()) - fields.get("guest", 0.0) - fields.get("guest_nice", 0.0)
    idle = fields["idle"] + fields.get("iowait", 0.0) + (fields.get("nice", 0.0) if niced_idle else 0.0)
    return total - idle, total


class CpuMeter:
    """The node's CPU utilisation since the previous reading (see the module doc)."""

    def __init__(
        self,
        times: Callable[[], Any] = psutil.cpu_times,
        clock: Callable[[], float] = time.time,
        niced_idle: bool | None = None,
    ) -> None:
        """``niced_idle``: count niced time as idle; None: when this process runs at nice 0 (a stack
        started under ``nice`` has its replicas' time there too)."""
        self._times = times
        self._clock = clock
        self._niced_idle = os.nice(0) == 0 if niced_idle is None else niced_idle
        self._last = (clock(), _busy_and_total(times(), self._niced_idle))

    def read(self, *, advance: bool = True) -> CpuReading:
        """The busy share since the last advancing reading; ``advance=False`` leaves that point where it
        is (the doctor's look at the time since the last sample, which the sampler's next one covers)."""
        since, (busy0, total0) = self._last
        now, (busy, total) = self._clock(), _busy_and_total(self._times(), self._niced_idle)
        if now - since < MIN_READING_S:  # the counters tick in hundredths: too short to say
            return CpuReading(since, now, None)
        if advance:
            self._last = (now, (busy, total))
        spent = total - total0
        percent = min(max((busy - busy0) / spent * 100, 0.0), 100.0) if spent > 0 else None
        return CpuReading(since, now, percent)


def publish_inventory(
    inventory: NodeInventory, metrics: DeviceMetrics, cpu: CpuReading | None = None
) -> None:
    """Set every device gauge of ``inventory``'s node, and with ``cpu`` (the interval the sample closes)
    add a point to the utilisation history; GPUs no longer read lose their series."""
    node = inventory.hostname
    metrics.set_node(
        node,
        load1=inventory.cpu.load_avg[0],
        usable_cores=inventory.cpu.usable_physical,
        memory_total=inventory.memory_total_bytes,
        memory_available=inventory.memory_available_bytes,
        utilization_pct=None if cpu is None else cpu.percent,
    )
    seen: set[tuple[str, str, str, str]] = set()
    for gpu in inventory.gpus:
        labels = (node, str(gpu.index), gpu.uuid, gpu.name)
        seen.add(labels)
        metrics.set_gpu(
            labels,
            utilization_pct=gpu.utilization_pct,
            memory_used=gpu.memory_used_bytes,
            memory_free=gpu.memory_free_bytes,
            temperature_c=gpu.temperature_c,
            power_w=gpu.power_w,
        )
    metrics.forget_gpus(seen)
    if cpu is not None:
        used = [g.utilization_pct for g in inventory.gpus if g.utilization_pct is not None]
        metrics.record(cpu.start, cpu.end, cpu.percent, sum(used) / len(used) if used else None)


async def sample_devices_forever(
    metrics: DeviceMetrics,
    every_s: float = DEFAULT_SAMPLE_INTERVAL_S,
    probe: Callable[[], NodeInventory] = probe_inventory,
    meter: CpuMeter | None = None,
) -> None:
    """Sample ``probe`` and ``meter`` (a new one if None) every ``every_s`` seconds into ``metrics`` until
    cancelled."""
    meter = meter or CpuMeter()
    while True:
        pause = every_s
        try:
            inventory = await asyncio.to_thread(probe)
            reading = meter.read()
            # moments after the meter was made (the first sample) the CPU has no figure yet: the gauges
            # now, and the next sample in a quarter second, not a whole period later
            early = reading.percent is None and reading.end - reading.start < MIN_READING_S
            pause = MIN_READING_S if early else every_s
            publish_inventory(inventory, metrics, None if early else reading)
        except Exception:  # a broken sample must not end telemetry for the process's life
            log.exception("device telemetry: a sample failed; the next one is in %.0f s", every_s)
        await asyncio.sleep(pause)
