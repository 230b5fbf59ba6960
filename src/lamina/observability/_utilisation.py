"""A device's utilisation while a window's requests ran, from the device sampler's periods.

The doctor quotes the CPU (and GPUs) the requests actually ran on: each sample period (the device
sampler's, 15 s) weighs by the time requests ran in it, so an idle stretch before or after a burst does
not dilute it, and a reading taken when the doctor is asked (after the burst, usually idle) is only the
fallback when no period covers the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lamina.observability._trace_views import TraceLine


@dataclass(frozen=True)
class DeviceState:
    """The machine's CPU and GPUs as the doctor read them at the time it was asked."""

    cpu_percent: float | None = None
    #: the machine's GPUs, and their mean utilisation (%) when known
    gpus: int = 0
    gpu_percent: float | None = None


@dataclass(frozen=True)
class DeviceSample:
    """One sample period of the machine's devices (epoch seconds): the busy percent of its CPU time and
    the mean utilisation of its GPUs (None: not read)."""

    start: float
    end: float
    cpu_percent: float | None
    gpu_percent: float | None


@dataclass(frozen=True)
class Utilisation:
    """A device's utilisation as the evidence quotes it: its mean over the sample periods in which the
    window's requests ran, weighted by the time they ran in each, and the highest of those periods; or,
    with no such period (``during`` False), as read when the doctor was asked."""

    percent: float
    peak: float
    during: bool

    def words(self, device: str) -> str:
        if not self.during:
            return f"compute: {device} {self.percent:.0f}% now"
        peak = f", peak {self.peak:.0f}%" if self.peak >= self.percent + 0.5 else ""
        return f"compute: {device} {self.percent:.0f}% while the requests ran{peak}"


def _busy_spans(traces: Sequence[TraceLine]) -> list[list[float]]:
    """The times (epoch seconds) in which at least one of ``traces`` ran, merged, in order."""
    merged: list[list[float]] = []
    for start, end in sorted(
        (t.start.timestamp(), t.start.timestamp() + t.duration_ms / 1000) for t in traces
    ):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def utilisation(
    traces: Sequence[TraceLine], history: Sequence[DeviceSample], now: DeviceState
) -> tuple[Utilisation | None, Utilisation | None]:
    """The CPU's and the GPUs' :class:`Utilisation` over the periods of ``history`` in which ``traces``
    ran, each falling back to its reading ``now`` (None: neither is known)."""
    spans, first = _busy_spans(traces), 0
    weighted: dict[str, list[tuple[float, float]]] = {"cpu": [], "gpu": []}
    for sample in sorted(history, key=lambda h: h.start):
        while first < len(spans) and spans[first][1] <= sample.start:
            first += 1
        ran, i = 0.0, first
        while i < len(spans) and spans[i][0] < sample.end:
            ran += max(min(spans[i][1], sample.end) - max(spans[i][0], sample.start), 0.0)
            i += 1
        for device, value in (("cpu", sample.cpu_percent), ("gpu", sample.gpu_percent)):
            if ran > 0 and value is not None:
                weighted[device].append((value, ran))

    def of(device: str, instant: float | None) -> Utilisation | None:
        points = weighted[device]
        if points:
            mean = sum(v * w for v, w in points) / sum(w for _, w in points)
            return Utilisation(mean, max(v for v, _ in points), during=True)
        return None if instant is None else Utilisation(instant, instant, during=False)

    return of("cpu", now.cpu_percent), of("gpu", now.gpu_percent)
