"""Layer: compute. The devices of this machine (CPU cores, memory, NVIDIA GPUs) and the defaults they
imply; placement and utilization telemetry build on this inventory."""

from lamina.compute._devices import (
    GPUInfo,
    GPUProbeError,
    NodeInventory,
    NVMLProbe,
    PynvmlProbe,
    default_threads,
    probe_gpus,
    probe_inventory,
)

__all__ = [
    "GPUInfo",
    "GPUProbeError",
    "NVMLProbe",
    "NodeInventory",
    "PynvmlProbe",
    "default_threads",
    "probe_gpus",
    "probe_inventory",
]
