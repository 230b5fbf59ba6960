"""The autoscaler on the Azure LLM inference trace: TTFT and replica-seconds next to fixed provisioning.

    .venv/bin/python bench/autoscale_azure.py [TRACE.csv] [--speedup 1] [--json] [--slo-p95-s 2.0] ...

TRACE is any CSV with the columns of ../shared/data/traces/azure-llm-2023-code.csv (TIMESTAMP,
ContextTokens, GeneratedTokens; the default). It is a SIMULATION driven by the real policy code: every
control-loop tick feeds ``lamina.orchestration.ReplicaAutoscaler`` the same observation the controller
gives it (requests in flight on the deployment's replicas, running or queued there, plus those waiting for
a ready replica) and applies its decision the way the controller does (new replicas are ready after
``--startup-s``; a replica scaled away leaves rotation at once and stops once its last request ends; each
request goes to the least-loaded ready replica, ``lamina.orchestration.pick_replica``). What is simulated
is the replica itself: a fake-engine-like server with ``--slots`` sequences decoding at once, each taking
``ContextTokens / --prefill-tps`` seconds of prefill (its time to first token after it starts) and
``--tpot-s`` per generated token. It is not run against live processes because an hour of trace with up to
16 replicas does not fit this 2-core machine shared with other work; the policy, not the processes, is
what is measured.

Fixed provisioning runs the same simulation with as many replicas as the autoscaler's peak, all of them
ready for the whole trace. The target: TTFT p95 within the SLO (``--slo-p95-s``) with at most 60% of the
replica-seconds of peak provisioning. ``--speedup K`` compresses the trace's time K-fold (K times the load).
"""

from __future__ import annotations

import argparse
import csv
import heapq
import itertools
import json
import math
import sys
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lamina.orchestration import (
    AutoscalePolicy,
    LoadObservation,
    ReplicaAutoscaler,
    ReplicaLoad,
    pick_replica,
)

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "azure-llm-2023-code.csv"


@dataclass(frozen=True)
class Request:
    at: float
    context: int
    generated: int


@dataclass
class Replica:
    rid: str
    launched: float
    ready_at: float
    slots: int
    running: int = 0
    queue: deque[tuple[Request, float]] = field(default_factory=deque)
    stopping: bool = False
    stopped: float | None = None

    @property
    def load(self) -> int:
        return self.running + len(self.queue)


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    replica_seconds: float = 0.0
    peak: int = 0
    decisions: int = 0

    def summary(self, slo_s: float) -> dict[str, float | int]:
        ttft = sorted(self.ttft)

        def q(p: float) -> float:
            return ttft[min(len(ttft) - 1, math.ceil(p * len(ttft)) - 1)]

        return {
            "requests": len(ttft),
            "ttft_p50_s": round(q(0.50), 3),
            "ttft_p95_s": round(q(0.95), 3),
            "ttft_p99_s": round(q(0.99), 3),
            "within_slo_share": round(sum(t <= slo_s for t in ttft) / len(ttft), 4),
            "replica_seconds": round(self.replica_seconds, 1),
            "peak_replicas": self.peak,
        }


def read_trace(path: Path, speedup: float) -> list[Request]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= set(rows[0]):
        raise SystemExit(f"{path}: expected the columns TIMESTAMP,ContextTokens,GeneratedTokens")
    stamps = [datetime.fromisoformat(r["TIMESTAMP"].strip()[:26]) for r in rows]
    t0 = min(stamps)
    out = [
        Request((t - t0).total_seconds() / speedup, int(r["ContextTokens"]), int(r["GeneratedTokens"]))
        for t, r in zip(stamps, rows, strict=True)
    ]
    return sorted(out, key=lambda r: r.at)


class Simulation:
    """Discrete events: arrivals, request phases, replicas ready, control-loop ticks."""

    def __init__(self, args: argparse.Namespace, policy: AutoscalePolicy | None, fixed: int = 0) -> None:
        self.a = args
        self.policy = policy
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = itertools.count()
        self.replicas: list[Replica] = []
        self.waiting: deque[Request] = deque()
        self.result = Result()
        self.ids = itertools.count()
        self.picks = 0
        self.scaler = ReplicaAutoscaler(policy, 0.0) if policy else None
        for _ in range(policy.initial if policy else fixed):
            self._launch(0.0, ready_at=0.0)

    def push(self, at: float, kind: str, payload: object = None) -> None:
        heapq.heappush(self.events, (at, next(self.seq), kind, payload))

    def _launch(self, now: float, ready_at: float | None = None) -> None:
        ready = now + self.a.startup_s if ready_at is None else ready_at
        replica = Replica(f"r{next(self.ids)}", now, ready, self.a.slots)
        self.replicas.append(replica)
        self.push(ready, "ready", replica)

    def _live(self) -> list[Replica]:
        return [r for r in self.replicas if r.stopped is None and not r.stopping]

    def _routable(self, now: float) -> list[Replica]:
        return [r for r in self._live() if r.ready_at <= now]

    def _route(self, now: float, req: Request) -> None:
        ready = self._routable(now)
        if not ready:
            self.waiting.append(req)
            return
        rid = pick_replica([ReplicaLoad(r.rid, r.load) for r in ready], self.picks)
        self.picks += 1
        replica = next(r for r in ready if r.rid == rid)
        replica.queue.append((req, now))
        self._fill(now, replica)

    def _fill(self, now: float, replica: Replica) -> None:
        while replica.running < replica.slots and replica.queue:
            req, _ = replica.queue.popleft()
            replica.running += 1
            first = now + req.context / self.a.prefill_tps
            self.result.ttft.append(first - req.at)
            self.push(first + req.generated * self.a.tpot_s, "done", replica)

    def _stop(self, now: float, replica: Replica) -> None:
        replica.stopped = now
        self.result.replica_seconds += now - replica.launched

    def _tick(self, now: float) -> None:
        assert self.scaler is not None and self.policy is not None
        live = self._live()
        in_flight = sum(r.load for r in live)
        decision = self.scaler.observe(LoadObservation(now, in_flight, len(self.waiting)), len(live))
        self.result.decisions += 1
        want = decision.desired
        if want > len(live):
            for _ in range(want - len(live)):
                self._launch(now)
        elif want < len(live):
            # the least useful first, as the reconcile plan does: starting ones, then the least loaded
            order = sorted(live, key=lambda r: (r.ready_at <= now, r.load))
            for replica in order[: len(live) - want]:
                replica.stopping = True
                if replica.load == 0:
                    self._stop(now, replica)

    def run(self, requests: list[Request]) -> Result:
        for req in requests:
            self.push(req.at, "arrive", req)
        end = requests[-1].at if requests else 0.0
        if self.scaler is not None:
            t = 0.0
            while t <= end + self.a.tick_s:
                self.push(t, "tick")
                t += self.a.tick_s
        now = 0.0
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                assert isinstance(payload, Request)
                self._route(now, payload)
            elif kind == "done":
                assert isinstance(payload, Replica)
                payload.running -= 1
                self._fill(now, payload)
                if payload.stopping and payload.load == 0 and payload.stopped is None:
                    self._stop(now, payload)
            elif kind == "ready":
                assert isinstance(payload, Replica)
                while self.waiting and self._routable(now):
                    self._route(now, self.waiting.popleft())
            elif kind == "tick":
                self._tick(now)
            self.result.peak = max(self.result.peak, len(self._live()))
        finish = max(end, now) if requests else 0.0
        for replica in self.replicas:
            if replica.stopped is None:
                self._stop(max(finish, replica.launched), replica)
        return self.result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", nargs="?", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--speedup", type=float, default=1.0, help="compress the trace's time K-fold")
    p.add_argument("--slots", type=int, default=4, help="sequences a replica decodes at once")
    p.add_argument("--tpot-s", type=float, default=0.02, help="seconds per generated token (50 tokens/s)")
    p.add_argument("--prefill-tps", type=float, default=8000.0, help="prompt tokens per second of prefill")
    p.add_argument("--startup-s", type=float, default=5.0, help="seconds from launch to a ready replica")
    p.add_argument("--tick-s", type=float, default=1.0, help="control-loop period (health_interval_s)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=16)
    p.add_argument("--target-concurrency", type=float, default=2.0)
    p.add_argument("--window-s", type=float, default=5.0)
    p.add_argument("--upscale-delay-s", type=float, default=1.0)
    p.add_argument("--downscale-delay-s", type=float, default=60.0)
    p.add_argument("--slo-p95-s", type=float, default=2.0, help="the TTFT p95 to stay within")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    requests = read_trace(args.trace, args.speedup)
    policy = AutoscalePolicy(
        args.min_replicas,
        args.max_replicas,
        target_concurrency=args.target_concurrency,
        window_s=args.window_s,
        upscale_delay_s=args.upscale_delay_s,
        downscale_delay_s=args.downscale_delay_s,
    )
    auto = Simulation(args, policy).run(requests)
    fixed = Simulation(args, None, fixed=auto.peak).run(requests)
    a, f = auto.summary(args.slo_p95_s), fixed.summary(args.slo_p95_s)
    share = a["replica_seconds"] / f["replica_seconds"] if f["replica_seconds"] else float("nan")
    report = {
        "trace": str(args.trace),
        "duration_s": round(requests[-1].at - requests[0].at, 1) if requests else 0,
        "slo_ttft_p95_s": args.slo_p95_s,
        "autoscaled": a,
        "fixed_at_peak": f,
        "replica_seconds_share": round(share, 4),
        "meets_target": bool(a["ttft_p95_s"] <= args.slo_p95_s and share <= 0.60),
        "settings": {k: v for k, v in vars(args).items() if k not in ("trace", "json")},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{len(requests)} requests over {report['duration_s']} s "
        f"({args.trace.name}, speedup {args.speedup:g})"
    )
    print(f"{'':16}{'TTFT p50':>10}{'TTFT p95':>10}{'TTFT p99':>10}{'replica-s':>12}{'peak':>6}")
    for name, s in (("autoscaled", a), (f"fixed x{auto.peak}", f)):
        print(
            f"{name:16}{s['ttft_p50_s']:>9.3f}s{s['ttft_p95_s']:>9.3f}s{s['ttft_p99_s']:>9.3f}s"
            f"{s['replica_seconds']:>12.0f}{s['peak_replicas']:>6}"
        )
    verdict = "meets" if report["meets_target"] else "misses"
    print(
        f"autoscaled uses {share:.1%} of the replica-seconds of peak provisioning; TTFT p95 "
        f"{a['ttft_p95_s']:.3f} s vs SLO {args.slo_p95_s:g} s: {verdict} the target (p95 within SLO, <= 60%)"
    )


if __name__ == "__main__":
    main()
