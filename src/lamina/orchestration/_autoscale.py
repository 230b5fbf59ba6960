"""Autoscaling on traffic, as a policy: observations of load in, a desired replica count and its reason out.

The shape of Ray Serve's default policy (and of Knative's stable window): the load of a deployment is the
requests the gateway has in flight on its replicas, running or queued there, plus requests waiting for a
replica at all; averaged over ``window_s`` it asks for ``ceil(load / target_concurrency)`` replicas, kept
between ``min_replicas`` and ``max_replicas``. A count above the current one is carried out once it has
been asked for without a break for ``upscale_delay_s``, one below after ``downscale_delay_s`` (to the
highest count asked for meanwhile, so a dip does not shed capacity a burst needs). With ``min_replicas``
0 the deployment scales to zero after ``idle_delay_s`` without a request, and a request that arrives at
zero replicas starts one at once (a cold start: it waits up to ``cold_start_budget_s``).

:class:`ReplicaAutoscaler` keeps the window and the pending proposal; the time is the observation's, so tests
drive it with a fake clock and no sleeping. It starts nothing: the controller applies its decisions.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from lamina.errors import ConfigError


@dataclass(frozen=True)
class AutoscalePolicy:
    """The limits and delays of one deployment's autoscaler; times in seconds of the controller's clock."""

    min_replicas: int
    max_replicas: int
    #: requests in flight per replica (running or queued on it) to aim at (Ray Serve's default: 2)
    target_concurrency: float = 2.0
    #: load is averaged over this many seconds before it is turned into a replica count
    window_s: float = 10.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    #: with ``min_replicas`` 0: seconds without a request before the deployment scales to zero
    idle_delay_s: float = 300.0
    #: with ``min_replicas`` 0: how long a request arriving at zero replicas waits for one to be ready
    cold_start_budget_s: float = 60.0

    def __post_init__(self) -> None:
        problems = []
        if self.min_replicas < 0:
            problems.append(f"min_replicas must be 0 or more, not {self.min_replicas}")
        if self.max_replicas < max(self.min_replicas, 1):
            problems.append(
                f"max_replicas ({self.max_replicas}) must be at least 1 and at least min_replicas "
                f"({self.min_replicas})"
            )
        if not self.target_concurrency > 0:
            problems.append(f"target_concurrency must be above 0, not {self.target_concurrency}")
        for name in ("window_s", "upscale_delay_s", "downscale_delay_s", "idle_delay_s"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be 0 or more, not {getattr(self, name)}")
        if not self.cold_start_budget_s > 0:
            problems.append(f"cold_start_budget_s must be above 0, not {self.cold_start_budget_s}")
        if problems:
            raise ConfigError("invalid autoscaling: " + "; ".join(problems))

    @property
    def scale_to_zero(self) -> bool:
        return self.min_replicas == 0

    @property
    def initial(self) -> int:
        """The replicas to start with: ``min_replicas``, and 1 for a deployment that may scale to zero."""
        return max(self.min_replicas, 1)


@dataclass(frozen=True)
class LoadObservation:
    """The load of one deployment at ``at``: requests in flight on its replicas (running or queued there)
    and requests waiting for a ready replica (none is: a cold start, or every replica restarting)."""

    at: float
    in_flight: int
    waiting: int = 0

    @property
    def load(self) -> int:
        return self.in_flight + self.waiting


@dataclass(frozen=True)
class ScaleDecision:
    """What the autoscaler decided at ``at``: the replicas wanted, why, and the averaged load it saw."""

    desired: int
    reason: str
    at: float
    load: float

    def to_json(self) -> dict[str, object]:
        return {"desired": self.desired, "reason": self.reason, "load": round(self.load, 3)}


class ReplicaAutoscaler:
    """One deployment's autoscaler: feed it :meth:`observe` every control-loop step."""

    def __init__(self, policy: AutoscalePolicy, now: float) -> None:
        self.policy = policy
        self._window: deque[LoadObservation] = deque()
        self._last_active = now
        #: since when a count above (below) the current one has been asked for without a break
        self._up_since: float | None = None
        self._down_since: float | None = None
        self._down_peak = 0
        self.last: ScaleDecision | None = None

    def observe(self, obs: LoadObservation, current: int) -> ScaleDecision:
        """The replica count wanted now, given ``current`` desired replicas and the newest observation."""
        decision = self._decide(obs, current)
        self.last = decision
        return decision

    def _decide(self, obs: LoadObservation, current: int) -> ScaleDecision:
        p = self.policy
        if self._window and self._window[-1].at == obs.at:
            self._window.pop()  # one sample per instant: a burst of steps must not outweigh the rest
        self._window.append(obs)
        while self._window and self._window[0].at < obs.at - p.window_s:
            self._window.popleft()
        load = sum(o.load for o in self._window) / len(self._window)
        if obs.load > 0:
            self._last_active = obs.at
        idle_s = obs.at - self._last_active

        def done(desired: int, reason: str) -> ScaleDecision:
            return ScaleDecision(desired, reason, obs.at, load)

        if current == 0 and obs.load > 0:
            self._reset()
            wanted = self._clamp(max(math.ceil(obs.load / p.target_concurrency), 1))
            return done(wanted, f"cold start: {obs.load} request(s) arrived at zero replicas")
        if current < p.min_replicas or current > p.max_replicas:
            self._reset()
            wanted = self._clamp(current)
            return done(wanted, f"{current} is outside {p.min_replicas}..{p.max_replicas}: set to {wanted}")
        if p.scale_to_zero and load == 0 and idle_s >= p.idle_delay_s:
            self._reset()
            if current == 0:
                return done(0, f"scaled to zero: no request for {idle_s:.0f} s")
            return done(0, f"no request for {idle_s:.0f} s (idle delay {p.idle_delay_s:g} s): scale to zero")
        wanted = self._clamp(max(math.ceil(load / p.target_concurrency), 1 if current else 0))
        per = f"load {load:.2f} / target {p.target_concurrency:g} per replica"
        if wanted > current:
            self._down_since = None
            self._up_since = obs.at if self._up_since is None else self._up_since
            held = obs.at - self._up_since
            if held >= p.upscale_delay_s:
                self._reset()
                return done(wanted, f"{per} wants {wanted} for {held:.1f} s: scale up from {current}")
            return done(current, f"{per} wants {wanted}; scaling up after {p.upscale_delay_s:g} s of it")
        if wanted < current:
            self._up_since = None
            if self._down_since is None:
                self._down_since, self._down_peak = obs.at, wanted
            self._down_peak = max(self._down_peak, wanted)
            held = obs.at - self._down_since
            if held >= p.downscale_delay_s:
                target = self._down_peak
                self._reset()
                return done(
                    target, f"{per} wanted at most {target} for {held:.1f} s: scale down from {current}"
                )
            return done(current, f"{per} wants {wanted}; scaling down after {p.downscale_delay_s:g} s of it")
        self._reset()
        return done(current, f"steady: {per} fits {current} replica(s)")

    def _clamp(self, n: int) -> int:
        p = self.policy
        return min(max(n, p.min_replicas), p.max_replicas)

    def _reset(self) -> None:
        self._up_since = self._down_since = None
        self._down_peak = 0
