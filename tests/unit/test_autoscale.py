"""The autoscaling policy, rule by rule, on a fake clock: load in, replica count and reason out."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lamina.config import AutoscaleConfig, DeploymentConfig
from lamina.errors import ConfigError
from lamina.orchestration import AutoscalePolicy, LoadObservation, ReplicaAutoscaler, ScaleDecision
from tests.support.clock import FakeClock


class Driver:
    """Feeds the autoscaler one observation per ``step_s`` seconds of a fake clock and applies its count."""

    def __init__(self, policy: AutoscalePolicy, step_s: float = 1.0) -> None:
        self.clock = FakeClock()
        self.scaler = ReplicaAutoscaler(policy, self.clock.monotonic())
        self.current = policy.initial
        self.step_s = step_s

    def run(self, seconds: float, in_flight: int, waiting: int = 0) -> ScaleDecision:
        decision = None
        for _ in range(round(seconds / self.step_s)):
            self.clock.advance(self.step_s)
            decision = self.scaler.observe(
                LoadObservation(self.clock.monotonic(), in_flight, waiting), self.current
            )
            self.current = decision.desired
        assert decision is not None
        return decision


def policy(**kw: float) -> AutoscalePolicy:
    base: dict[str, float] = {
        "min_replicas": 1,
        "max_replicas": 5,
        "target_concurrency": 2,
        "window_s": 0,
        "upscale_delay_s": 3,
        "downscale_delay_s": 10,
    }
    base.update(kw)
    return AutoscalePolicy(**base)  # type: ignore[arg-type]


def test_desired_is_the_load_over_the_target_rounded_up() -> None:
    d = Driver(policy(upscale_delay_s=0))
    assert d.run(1, in_flight=5).desired == 3  # ceil(5 / 2)
    assert d.run(1, in_flight=6).desired == 3
    assert "steady" in d.run(1, in_flight=6).reason


def test_upscale_waits_for_sustained_need() -> None:
    d = Driver(policy(upscale_delay_s=3))
    first = d.run(1, in_flight=8)
    assert first.desired == 1 and "after 3 s" in first.reason
    assert d.run(2, in_flight=8).desired == 1  # 2 s of need: not yet
    up = d.run(1, in_flight=8)
    assert up.desired == 4 and "scale up from 1" in up.reason


def test_a_break_in_the_need_restarts_the_upscale_delay() -> None:
    d = Driver(policy(upscale_delay_s=3))
    d.run(2, in_flight=8)
    d.run(1, in_flight=2)  # fits one replica: the pending upscale is dropped
    assert d.run(2, in_flight=8).desired == 1
    assert d.run(2, in_flight=8).desired == 4


def test_downscale_waits_longer_and_keeps_the_highest_count_asked_for() -> None:
    d = Driver(policy(upscale_delay_s=0, downscale_delay_s=10))
    assert d.run(1, in_flight=10).desired == 5
    d.run(5, in_flight=2)  # from t=2 s it wants 1
    d.run(1, in_flight=6)  # wants 3 for a moment (still fewer than 5: the slack goes on)
    assert d.run(4, in_flight=2).desired == 5  # t=11 s: 9 s of slack, not yet
    down = d.run(1, in_flight=2)  # t=12 s: 10 s
    assert down.desired == 3 and "scale down from 5" in down.reason


def test_never_below_min_nor_above_max() -> None:
    d = Driver(policy(min_replicas=2, max_replicas=3, upscale_delay_s=0, downscale_delay_s=0))
    assert d.current == 2
    assert d.run(1, in_flight=100).desired == 3
    assert d.run(1, in_flight=0).desired == 2


def test_the_load_is_averaged_over_the_window() -> None:
    d = Driver(policy(window_s=4, upscale_delay_s=0))
    d.run(4, in_flight=0)
    spike = d.run(1, in_flight=10)  # one second of 10 among four of 0: an average of 2
    assert spike.load == pytest.approx(2.0) and spike.desired == 1
    assert d.run(4, in_flight=10).desired == 5


def test_scale_to_zero_after_the_idle_delay_and_not_before() -> None:
    d = Driver(policy(min_replicas=0, idle_delay_s=30, downscale_delay_s=0))
    assert d.current == 1  # a deployment that may scale to zero starts with one replica
    assert d.run(29, in_flight=0).desired == 1
    zero = d.run(1, in_flight=0)
    assert zero.desired == 0 and "scale to zero" in zero.reason
    assert d.run(60, in_flight=0).desired == 0


def test_a_request_at_zero_replicas_starts_one_at_once() -> None:
    d = Driver(policy(min_replicas=0, idle_delay_s=5, upscale_delay_s=30))
    d.run(5, in_flight=0)
    assert d.current == 0
    cold = d.run(1, in_flight=0, waiting=1)
    assert cold.desired == 1 and "cold start" in cold.reason  # no upscale delay for the first replica
    assert d.run(4, in_flight=1).desired == 1  # busy again: the idle clock restarted
    assert d.run(5, in_flight=0).desired == 0


def test_invalid_policies_are_refused_with_what_to_change() -> None:
    with pytest.raises(ConfigError, match="max_replicas"):
        AutoscalePolicy(3, 2)
    with pytest.raises(ConfigError, match="target_concurrency"):
        AutoscalePolicy(1, 2, target_concurrency=0)
    with pytest.raises(ConfigError, match="min_replicas"):
        AutoscalePolicy(-1, 2)


def test_a_config_deployment_takes_an_autoscale_block() -> None:
    deployment = DeploymentConfig.model_validate(
        {"name": "chat", "engine": "fake", "autoscale": {"min_replicas": 0, "max_replicas": 3}}
    )
    assert deployment.autoscale is not None
    policy = AutoscalePolicy(**deployment.autoscale.model_dump())
    assert policy.scale_to_zero and policy.initial == 1 and policy.target_concurrency == 2
    with pytest.raises(ValidationError, match="must not exceed"):
        AutoscaleConfig(min_replicas=3, max_replicas=2)
