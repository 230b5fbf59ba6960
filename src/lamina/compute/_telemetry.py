"""Device telemetry: the inventory sampled in the background and exported as ``lamina_device_*`` gauges.

:func:`publish_inventory` turns one inventory into gauge values; :func:`sample_devices_forever` is the
loop the gateway's process runs (NVML and psutil block, so each sample runs in a worker thread). A sample
that fails is logged and the loop goes on: telemetry never takes the gateway down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from lamina.compute._devices import NodeInventory, probe_inventory

if TYPE_CHECKING:  # the gauges are handed in; importing compute must not load the metrics stack
    from lamina.observability import DeviceMetrics

log = logging.getLogger(__name__)

#: seconds between samples: DCGM's default field update interval is 30 s; Prometheus scrapes at 15-60 s
DEFAULT_SAMPLE_INTERVAL_S = 15.0


def publish_inventory(inventory: NodeInventory, metrics: DeviceMetrics) -> None:
    """Set every device gauge of ``inventory``'s node; GPUs no longer read lose their series."""
    node = inventory.hostname
    metrics.set_node(
        node,
        load1=inventory.cpu.load_avg[0],
        usable_cores=inventory.cpu.usable_physical,
        memory_total=inventory.memory_total_bytes,
        memory_available=inventory.memory_available_bytes,
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


async def sample_devices_forever(
    metrics: DeviceMetrics,
    every_s: float = DEFAULT_SAMPLE_INTERVAL_S,
    probe: Callable[[], NodeInventory] = probe_inventory,
) -> None:
    """Sample ``probe`` every ``every_s`` seconds into ``metrics`` until cancelled."""
    while True:
        try:
            publish_inventory(await asyncio.to_thread(probe), metrics)
        except Exception:  # a broken sample must not end telemetry for the process's life
            log.exception("device telemetry: a sample failed; the next one is in %.0f s", every_s)
        await asyncio.sleep(every_s)
