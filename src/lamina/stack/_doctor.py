"""The doctor's inputs, gathered from a running stack (or from the state directory's store alone).

:func:`gather` reads what the pure analysis (``lamina.observability.diagnose``) needs: the traces of the
window from the store, and, when the stack runs in this process, its replicas, in-flight calls, the
machine's CPU and GPUs (now, and the device sampler's periods, from which the doctor takes those in
which the window's requests ran), the datasets' search indexes, the newest drift reports and the global
budget.
Every source that fails is logged and left out: the doctor answers with what it could read.

``lamina doctor`` asks a running gateway (``GET /admin/v1/doctor``) so the live figures are included;
with no gateway answering it runs :func:`gather_offline` over the store: traces, drift reports and the
budget only (no replicas, no in-flight calls, this machine's CPU as it is now).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from lamina.application import Budget, CostLedger, Doctor
from lamina.clock import utcnow
from lamina.compute import CpuMeter, CpuReading, probe_inventory
from lamina.config import LaminaConfig
from lamina.data import DriftReports, GraphIndex
from lamina.data.drift import since_of
from lamina.errors import LaminaError
from lamina.observability import (
    BudgetState,
    DatasetState,
    DeploymentState,
    DeviceSample,
    DeviceState,
    DoctorInputs,
    DriftState,
    TraceLine,
    Verdict,
    diagnose,
    recent_traces,
)
from lamina.store import Store

if TYPE_CHECKING:
    from lamina.stack.gateway import Stack

log = logging.getLogger("lamina.doctor")

#: the most traces of a window the doctor reads (the newest)
MAX_TRACES = 2_000


def _traces(store: Store, window: str) -> list[TraceLine]:
    return recent_traces(store, since_of(window, utcnow(), "window"), MAX_TRACES)


def _device(cpu_percent: float | None = None) -> DeviceState:
    """The devices now; ``cpu_percent`` the CPU already read (None: read over half a second here)."""
    inventory = probe_inventory()
    utils = [g.utilization_pct for g in inventory.gpus if g.utilization_pct is not None]
    if cpu_percent is None:  # as the device sampler reads it (niced jobs' time is free time)
        meter = CpuMeter()
        time.sleep(0.5)
        cpu_percent = meter.read().percent
    return DeviceState(
        cpu_percent=cpu_percent,
        gpus=len(inventory.gpus),
        gpu_percent=sum(utils) / len(utils) if utils else None,
    )


def _history(stack: Stack, since: CpuReading | None) -> list[DeviceSample]:
    """The device sampler's periods, and ``since``, the CPU since its last one (its next covers it)."""
    tail = [] if since is None else [DeviceSample(since.start, since.end, since.percent, None)]
    return [*stack.telemetry.devices.history, *tail]


def _drift(store: Store) -> list[DriftState]:
    return [DriftState(r.dataset, r.drifted, r.explanation) for r in DriftReports(store).latest()]


def _budgets(config: LaminaConfig, store: Store) -> list[BudgetState]:
    costs = config.costs
    if costs.budget_usd is None:
        return []
    budget = Budget("global", "the gateway's budget", costs.budget_usd, costs.budget_period)
    spent, reserved = CostLedger(store).spend(budget, utcnow())
    return [BudgetState("global", spent + reserved, costs.budget_usd)]


T = TypeVar("T")


def _guarded(what: str, read: Callable[[], T], default: T) -> T:
    try:
        return read()
    except LaminaError as exc:
        log.warning("the doctor could not read %s: %s", what, exc.message)
    except Exception:  # one broken source (a driver, a backend) must not take the verdict down
        log.exception("the doctor could not read %s", what)
    return default


def _deployments(stack: Stack) -> list[DeploymentState]:
    registry = stack.telemetry.metrics.registry
    gpus = {w.name: w.resources.gpus for w in stack.workloads}
    out = []
    for d in stack.controller.status():
        in_flight = registry.get_sample_value("lamina_requests_in_flight", {"model": d.name}) or 0.0
        served = stack.catalog.get(d.name)
        ref = served.model_ref if served is not None else None
        slots = served.slots if served is not None else None
        weights = _guarded(f"{ref}'s weights", partial(_weights, stack, ref), None) if ref else None
        state = DeploymentState(
            d.name, d.ready, d.desired, int(in_flight), slots, gpus.get(d.name, 0), ref, weights
        )
        out.append(state)
    return out


def _weights(stack: Stack, ref: str) -> str | None:
    """The weight type the registry read from the file of ``ref`` (a GGUF's ``general.file_type``)."""
    found = stack.registry.get(ref, refused_ok=True).meta.get("quantization")
    return found if isinstance(found, str) else None


def _datasets(stack: Stack) -> list[DatasetState]:
    vectors = stack.data.vectors
    out = []
    for name in stack.data.catalog.names():
        rows = vectors.count(name)
        if isinstance(vectors.default_index(rows), GraphIndex) and not vectors.warm(name):
            out.append(DatasetState(name, True, f"{rows} chunks searched without a current graph index"))
        else:
            out.append(DatasetState(name, False))
    return out


def _inputs_of(stack: Stack, window: str) -> DoctorInputs:
    config, store = stack.config, stack.store
    # the CPU since the last device sample: the history's newest period, and the CPU "now" (no wait)
    since = _guarded("the CPU", lambda: stack.cpu.read(advance=False), None)
    cpu_now = None if since is None else since.percent
    if cpu_now is None:  # asked within a moment of a sample: that sample's period is "now"
        cpu_now = next((s.cpu_percent for s in reversed(stack.telemetry.devices.history)), None)
    return DoctorInputs(
        window=window,
        traces=_guarded("the traces", lambda: _traces(store, window), []),
        deployments=_guarded("the deployments", lambda: _deployments(stack), []),
        device=_guarded("the devices", lambda: _device(cpu_now), DeviceState()),
        history=_guarded("the device history", lambda: _history(stack, since), []),
        datasets=_guarded("the datasets", lambda: _datasets(stack), []),
        drift=_guarded("the drift reports", lambda: _drift(store), []),
        budgets=_guarded("the budgets", lambda: _budgets(config, store), []),
        cache_enabled=config.cache.enabled,
        guards=[g.name or g.kind for g in config.guards.input],
    )


async def gather(stack: Stack, window: str) -> Verdict:
    """The doctor's verdict on the running ``stack`` over ``window`` (blocking reads in a worker thread)."""
    return diagnose(await asyncio.to_thread(_inputs_of, stack, window))


def gather_offline(config: LaminaConfig, store: Store, window: str) -> Verdict:
    """The verdict from the store alone, for when no gateway runs (see the module doc)."""
    return diagnose(
        DoctorInputs(
            window=window,
            traces=_traces(store, window),
            device=_guarded("the devices", _device, DeviceState()),
            drift=_guarded("the drift reports", lambda: _drift(store), []),
            budgets=_guarded("the budgets", lambda: _budgets(config, store), []),
            cache_enabled=config.cache.enabled,
            guards=[g.name or g.kind for g in config.guards.input],
        )
    )


def doctor_for(stack: Stack) -> Doctor:
    """The gateway's ``/admin/v1/doctor`` over ``stack``."""

    async def doctor(window: str) -> Verdict:
        return await gather(stack, window)

    return doctor
