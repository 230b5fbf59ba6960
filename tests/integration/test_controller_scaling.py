"""The controller's run-time deployments, with real processes of the echo workload and a fake clock:
add and remove beside ``apply``, autoscaling in the loop, draining before stop, scale to zero and the
cold start with its budget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lamina.errors import ConflictError, ModelNotFoundError, NoReadyReplicaError
from lamina.orchestration import AutoscalePolicy, ReplicaState
from tests.support import FakeClock, echo_spec, local_controller, process_gone, step_until

pytestmark = pytest.mark.anyio


async def test_added_deployments_survive_apply_and_remove_stops_them(tmp_path: Path) -> None:
    async with local_controller(tmp_path) as controller:
        controller.apply([echo_spec("config")])
        controller.add(echo_spec("runtime"))
        with pytest.raises(ConflictError, match="exists already"):
            controller.add(echo_spec("runtime"))
        controller.apply([echo_spec("config")])  # the config applied again leaves the run-time one alone
        await step_until(controller, lambda: all(d.ready == 1 for d in controller.status()), "both ready")
        pid = next(d for d in controller.status() if d.name == "runtime").replicas[0].pid
        controller.remove("runtime")
        with pytest.raises(ModelNotFoundError):  # no longer routed to
            controller.ready_replicas("runtime")
        await step_until(controller, lambda: controller.gone("runtime"), "the removed deployment to go")
        assert process_gone(pid)
        assert [d.name for d in controller.status()] == ["config"]


async def test_a_replica_is_drained_before_it_stops(tmp_path: Path) -> None:
    load: dict[str, int] = {}
    async with local_controller(tmp_path, load=lambda: load, drain_grace_s=30) as controller:
        controller.add(echo_spec("d"))
        await step_until(controller, lambda: controller.status()[0].ready == 1, "ready")
        rid = controller.status()[0].replicas[0].replica_id
        pid = controller.status()[0].replicas[0].pid
        load[rid] = 1  # a request in flight on it
        controller.remove("d")
        for _ in range(5):
            await controller.step()
            await asyncio.sleep(0.05)
        replica = controller.status()[0].replicas[0]
        assert replica.state is ReplicaState.STOPPING and not process_gone(pid)  # draining, still serving
        load.clear()  # the request finished
        await step_until(controller, lambda: controller.gone("d"), "the drained replica to stop")
        assert process_gone(pid)


async def test_the_autoscaler_follows_the_load_in_the_loop(tmp_path: Path) -> None:
    clock = FakeClock()
    load: dict[str, int] = {}
    policy = AutoscalePolicy(1, 3, target_concurrency=2, window_s=0, upscale_delay_s=2, downscale_delay_s=5)
    kw = {"clock": clock.monotonic, "load": lambda: load}
    async with local_controller(tmp_path, **kw) as controller:
        controller.add(echo_spec("auto"), policy)
        await step_until(controller, lambda: controller.status()[0].ready == 1, "the first replica")
        load["auto-0"] = 6
        await controller.step()
        assert controller.status()[0].desired == 1  # wants 3, for less than the upscale delay
        clock.advance(2)
        await controller.step()
        assert controller.status()[0].desired == 3
        decision = controller.decision("auto")
        assert decision is not None and "scale up from 1" in decision.reason
        await step_until(controller, lambda: controller.status()[0].ready == 3, "three ready replicas")
        load.clear()
        await controller.step()
        clock.advance(5)
        await step_until(controller, lambda: len(controller.status()[0].replicas) == 1, "scaled down to one")


async def test_scale_to_zero_then_a_request_starts_a_replica(tmp_path: Path) -> None:
    clock = FakeClock()
    policy = AutoscalePolicy(0, 2, idle_delay_s=10, cold_start_budget_s=5)
    async with local_controller(tmp_path, clock=clock.monotonic) as controller:
        controller.add(echo_spec("lazy"), policy)
        await step_until(controller, lambda: controller.status()[0].ready == 1, "the initial replica")
        clock.advance(11)
        await step_until(controller, lambda: not controller.status()[0].replicas, "scaled to zero")
        assert controller.status()[0].desired == 0
        assert "scaled to zero" in controller.explain("lazy")
        assert controller.ready_replicas("lazy") == []  # a request arrives: a cold start begins
        assert controller.status()[0].desired == 1
        await step_until(controller, lambda: bool(controller.ready_replicas("lazy")), "the cold start")


async def test_a_cold_start_past_its_budget_is_a_503_naming_it(tmp_path: Path) -> None:
    clock = FakeClock()
    policy = AutoscalePolicy(0, 1, idle_delay_s=1, cold_start_budget_s=5)
    async with local_controller(tmp_path, clock=clock.monotonic) as controller:
        never_ready = echo_spec("cold", env={"ECHO_READY_DELAY_S": "3600"})
        controller.add(never_ready, policy)
        clock.advance(2)
        await controller.step()
        await step_until(controller, lambda: controller.status()[0].desired == 0, "scaled to zero")
        assert controller.ready_replicas("cold") == []  # the cold start begins
        clock.advance(4)
        assert controller.ready_replicas("cold") == []  # within the budget: the request keeps waiting
        clock.advance(2)
        with pytest.raises(NoReadyReplicaError, match="cold-start budget of 5 s") as err:
            controller.ready_replicas("cold")
        assert err.value.status == 503
