"""The reconcile loop: keeps each deployment's replicas running, healthy, and as many as desired.

``step()`` compares the desired state (set by ``apply``) with what runs, for every deployment, and acts:
it notices dead processes, health-checks the live ones, and carries out what
:func:`~lamina.orchestration._policy.reconcile_plan` decides (start, stop, restart after backoff, give up
on a replica that never became ready, or that was ready and then failed ``unhealthy_checks`` health
checks in a row: a stuck engine is replaced, not waited for). A failure while reconciling one deployment
is logged and retried at the next step; the loop itself never dies (the shape of Ray Serve's controller).
Deployments are also added and removed at run time (``add``, ``remove``); an autoscaled one's desired count
comes from its ReplicaAutoscaler at each step, and a replica scaled away or removed is drained first.
While a deployment rolls out a new version (``start_rollout``), its rollout says what starts and what is
drained (``_rollout_control``); each replica keeps the version and spec it was started from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import httpx

from lamina.errors import ConfigError, ConflictError, ModelNotFoundError, UnavailableError
from lamina.orchestration._autoscale import AutoscalePolicy, ReplicaAutoscaler, ScaleDecision
from lamina.orchestration._health import ReplicaHealth
from lamina.orchestration._local import ReplicaBackend
from lamina.orchestration._policy import Plan, ReconcileTimings, reconcile_plan
from lamina.orchestration._replicas import DeploymentRecord, ReplicaRecord, drained, explain, given_up
from lamina.orchestration._rollout_control import RolloutControl
from lamina.orchestration._workload import DeploymentStatus, ReplicaState, ReplicaStatus, WorkloadSpec

log = logging.getLogger(__name__)

#: the records under their old names, which ``_launch`` and ``_stop`` annotate with
_Replica = ReplicaRecord
_Deployment = DeploymentRecord


class Controller:
    """Runs the replicas of every deployment through a :class:`ReplicaBackend`.

    ``clock`` drives every policy decision (backoff, ready timeouts), so tests step the controller with a
    fake clock. ``run()`` calls ``step()`` every ``health_interval_s``, and at once after
    ``report_failure``. A ready replica leaves rotation at its first failed health check and is replaced
    after ``unhealthy_checks`` in a row.
    """

    def __init__(
        self,
        backend: ReplicaBackend,
        *,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
        health_interval_s: float = 1.0,
        restart_backoff_s: float = 0.5,
        restart_backoff_max_s: float = 30.0,
        health_timeout_s: float = 2.0,
        stop_grace_s: float = 5.0,
        unhealthy_checks: int = 3,
        load: Callable[[], Mapping[str, int]] | None = None,
        drain_grace_s: float = 30.0,
    ) -> None:
        if unhealthy_checks < 1:
            raise ConfigError(f"unhealthy_checks must be 1 or more, not {unhealthy_checks}")
        self._backend = backend
        self._clock = clock
        self._health_interval_s = health_interval_s
        self._backoff = (restart_backoff_s, restart_backoff_max_s)
        self._stop_grace_s = stop_grace_s
        self._unhealthy_checks = unhealthy_checks
        self._health = ReplicaHealth(backend, http, clock, health_timeout_s, unhealthy_checks)
        #: requests in flight by replica id (the dispatcher's ``in_flight``): autoscaling and draining
        self._load = load or dict
        self._drain_grace_s = drain_grace_s
        self._drains: set[asyncio.Task[None]] = set()
        self._deployments: dict[str, _Deployment] = {}
        #: called after each reconcile pass (the composition root's bookkeeping, e.g. finished rollouts)
        self.after_step: list[Callable[[], None]] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._closed = False

    # ---- desired state and queries ------------------------------------------------------------------

    def apply(self, specs: Sequence[WorkloadSpec]) -> None:
        """Make ``specs`` the desired state; deployments left out are scaled to zero and forgotten.

        A changed spec applies to replicas started (or restarted) from now on.
        """
        if self._closed:
            raise UnavailableError("the controller has shut down; start the stack again to apply specs")
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"deployment names must be unique; repeated: {', '.join(dupes)}")
        for spec in specs:
            dep = self._deployments.get(spec.name)
            if dep is None:
                self._deployments[spec.name] = _Deployment(spec, spec.replicas)
            else:
                dep.spec, dep.desired, dep.removed, dep.dynamic = spec, spec.replicas, False, False
        for name, dep in self._deployments.items():
            if name not in names and not dep.dynamic:
                dep.desired, dep.removed = 0, True
        self._wake.set()

    def add(self, spec: WorkloadSpec, autoscale: AutoscalePolicy | None = None) -> None:
        """Add a deployment at run time (``apply`` leaves it alone); with ``autoscale``, its replica count
        follows traffic between the policy's limits (starting at ``autoscale.initial``)."""
        if self._closed:
            raise UnavailableError("the controller has shut down; start the stack again to add deployments")
        if spec.name in self._deployments:
            raise ConflictError(
                f"a deployment named {spec.name!r} exists already (or is still draining); undeploy it "
                "first or choose another name"
            )
        now = self._clock()
        scaler = None if autoscale is None else ReplicaAutoscaler(autoscale, now)
        desired = spec.replicas if autoscale is None else autoscale.initial
        self._deployments[spec.name] = _Deployment(spec, desired, dynamic=True, autoscaler=scaler)
        self._wake.set()

    def remove(self, deployment: str) -> None:
        """Stop routing to ``deployment``: its replicas are drained (in-flight requests finish, up to the
        drain grace), stopped, and the deployment forgotten; ``gone`` says when."""
        dep = self._get(deployment)
        dep.desired, dep.removed, dep.autoscaler = 0, True, None  # no longer routed to: see ``_get``
        self._wake.set()

    def start_rollout(self, deployment: str, control: RolloutControl) -> None:
        """Roll ``deployment`` out to ``control``'s target (see ``_rollout``); one rollout at a time."""
        dep = self._get(deployment)
        if dep.rollout is not None and not dep.rollout.rollout.finished:
            raise ConflictError(
                f"{deployment!r} is rolling out {dep.rollout.rollout.target} already; "
                "promote it or roll it back first"
            )
        for replica in dep.replicas.values():
            replica.version = replica.version or control.rollout.stable
        dep.version, dep.rollout = dep.version or control.rollout.stable, control
        self._wake.set()

    def rollout(self, deployment: str) -> RolloutControl | None:
        """The deployment's rollout (the last one, when finished); None also for an unknown or removed
        deployment (a request that finished on one still reports its answer)."""
        dep = self._deployments.get(deployment)
        return None if dep is None or dep.removed else dep.rollout

    def wake(self) -> None:
        """Reconcile now (after a change such as a rollout promoted)."""
        self._wake.set()

    def gone(self, deployment: str) -> bool:
        """Whether ``deployment`` is no longer known: never added, or removed and every replica stopped."""
        return deployment not in self._deployments

    def decision(self, deployment: str) -> ScaleDecision | None:
        """The autoscaler's last decision for ``deployment`` (None: not autoscaled, or none made yet)."""
        scaler = self._get(deployment).autoscaler
        return None if scaler is None else scaler.last

    def status(self) -> list[DeploymentStatus]:
        """Every deployment (by name) with its replicas (in creation order)."""
        return [
            DeploymentStatus(name, dep.desired, tuple(r.status() for r in dep.replicas.values()))
            for name, dep in sorted(self._deployments.items())
        ]

    def ready_replicas(self, deployment: str) -> list[ReplicaStatus]:
        """The replicas of ``deployment`` that may take requests now.

        None ready for an autoscaled deployment counts as demand: at zero replicas, one is started at once
        (a cold start), and once the cold start has taken longer than the policy's budget, a
        NoReadyReplicaError naming the budget is raised.
        """
        dep = self._get(deployment)
        ready = [r.status() for r in dep.replicas.values() if r.state is ReplicaState.READY and r.handle]
        if ready:
            dep.cold_since = None
        elif dep.demand(deployment, self._clock()):  # a cold start: at zero replicas, one starts now
            self._wake.set()
        return ready

    def explain(self, deployment: str) -> str:
        return explain(deployment, self._get(deployment))  # one line, for error messages

    def report_failure(self, replica_id: str, reason: str) -> None:
        """Take a replica out of rotation at once (a request to it failed) and check it now."""
        for dep in self._deployments.values():
            replica = dep.replicas.get(replica_id)
            if replica is not None and replica.state is ReplicaState.READY:
                replica.state, replica.since = ReplicaState.UNHEALTHY, self._clock()
                replica.last_reason, replica.last_log_tail = reason, ""
                log.warning("replica %s taken out of rotation: %s", replica_id, reason)
        self._wake.set()

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return after the next reconcile step (or after ``timeout_s``): the moment to look again."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout_s)

    async def wait_ready(self, timeout_s: float, deployments: Sequence[str] | None = None) -> bool:
        """Wait until each deployment (all, or those named) has all its desired replicas ready.

        Needs ``run()`` going. Returns False when ``timeout_s`` (real seconds) passed first.
        """
        names = list(deployments) if deployments is not None else None
        for name in names or []:
            self._get(name)
        try:
            async with asyncio.timeout(timeout_s):
                while not self._all_ready(names):
                    await self.wait_for_change(self._health_interval_s)
        except TimeoutError:
            return False
        return True

    def _all_ready(self, names: list[str] | None) -> bool:
        deps = [self._get(n) for n in names] if names is not None else list(self._deployments.values())
        return all(d.ready() >= d.desired for d in deps if not d.removed)

    def _get(self, deployment: str) -> _Deployment:
        dep = self._deployments.get(deployment)
        if dep is None or dep.removed:
            known = ", ".join(sorted(n for n, d in self._deployments.items() if not d.removed)) or "none"
            raise ModelNotFoundError(
                f"no deployment named {deployment!r} (deployments: {known}); ask for one of those or add "
                "it to `deployments` in lamina.yaml",
                param="model",
            )
        return dep

    # ---- the loop -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile every ``health_interval_s`` until ``stop`` is set; no failure ends the loop."""
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.step()
            except Exception:
                log.exception("reconcile step failed; trying again at the next one")
            await self._pause(stop)

    async def _pause(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=self._health_interval_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def step(self) -> None:
        """One reconcile pass over every deployment."""
        async with self._lock:
            if self._closed:
                return
            names = list(self._deployments)
            for name in names:
                self._autoscale(name, self._deployments[name])
            await asyncio.gather(*(self._reconcile_safely(n) for n in names))
            for name in names:
                dep = self._deployments[name]
                if dep.removed and not dep.replicas:
                    del self._deployments[name]
        for hook in self.after_step:
            try:
                hook()
            except Exception:
                log.exception("a hook after the reconcile pass failed")
        self._notify_changed()

    def _autoscale(self, name: str, dep: _Deployment) -> None:
        """Feed the deployment's autoscaler (if any) its load now, and take its replica count."""
        if dep.autoscaler is not None and not dep.removed:
            try:
                dep.autoscale(name, self._load(), self._clock())
            except Exception:
                log.exception("autoscaling deployment %r failed; keeping %d replica(s)", name, dep.desired)

    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _reconcile_safely(self, name: str) -> None:
        try:
            await self._reconcile(self._deployments[name])
        except Exception:
            log.exception("reconciling deployment %r failed; retrying at the next step", name)

    async def _reconcile(self, dep: _Deployment) -> None:
        await self._health.check(dep)
        (base_s, max_s) = self._backoff
        timings = ReconcileTimings(dep.spec.ready_timeout_s, base_s, max_s, self._unhealthy_checks)
        views = [r.view() for r in dep.replicas.values()]
        step = dep.rollout.step(dep, self._clock()) if dep.rollout and not dep.removed else None
        live = sum(1 for v in views if v.state is not ReplicaState.STOPPING)
        desired = dep.desired if step is None else live  # a rollout decides what starts and stops
        await self._carry_out(dep, reconcile_plan(desired, views, self._clock(), timings))
        if step is not None and dep.rollout is not None:
            going = [rid for rid in step.stop if rid in dep.replicas]
            await asyncio.gather(*(self._stop_and_forget(dep, rid) for rid in going))
            for _ in range(step.start):
                self._new_replica(dep, dep.rollout.target_spec, dep.rollout.rollout.target)

    def _mark_dead(self, replica: _Replica, code: int | None, reason: str) -> None:
        self._health.mark_dead(replica, code, reason)

    async def _carry_out(self, dep: _Deployment, plan: Plan) -> None:
        await asyncio.gather(*(self._stop_and_forget(dep, rid) for rid in plan.stop))
        await asyncio.gather(*(self._give_up_on(dep, dep.replicas[rid]) for rid in plan.fail))
        for rid in plan.restart:
            replica = dep.replicas[rid]
            replica.restarts += 1
            self._launch(replica.spec or dep.spec, replica)
        for _ in range(plan.start):
            self._new_replica(dep, dep.spec, dep.version)

    def _new_replica(self, dep: _Deployment, spec: WorkloadSpec, version: str) -> None:
        rid = f"{dep.spec.name}-{dep.next_index}"
        dep.next_index += 1
        now = self._clock()
        dep.replicas[rid] = _Replica(
            rid, dep.spec.name, ReplicaState.STARTING, now, version=version, spec=spec
        )
        self._launch(spec, dep.replicas[rid])

    def _launch(self, spec: WorkloadSpec, replica: _Replica) -> None:
        """Start the replica's process (from the event loop's thread: see ``_local``)."""
        replica.state, replica.since = ReplicaState.STARTING, self._clock()
        try:
            handle = self._backend.start(spec, replica.replica_id)
        except OSError as exc:
            self._mark_dead(replica, None, f"could not start {spec.argv[0]!r} ({exc}); check its argv")
            return
        replica.handle, replica.log_path = handle, handle.log_path
        log.info("replica %s starting (pid %s)", replica.replica_id, handle.pid)

    async def _stop(self, replica: _Replica, grace_s: float) -> int | None:
        if replica.handle is None:
            return replica.last_exit_code
        return await asyncio.to_thread(self._backend.stop, replica.handle, grace_s)

    async def _stop_and_forget(self, dep: _Deployment, replica_id: str) -> None:
        """Take the replica out of rotation; stop it now if it has no request in flight, else drain it
        in the background (the loop goes on) and stop it once idle or after the drain grace."""
        replica = dep.replicas[replica_id]
        replica.state = ReplicaState.STOPPING
        if not self._load().get(replica_id, 0):
            await self._stop_forgotten(dep, replica)
            return
        task = asyncio.create_task(self._drain(dep, replica), name=f"lamina-drain-{replica_id}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, dep: _Deployment, replica: _Replica) -> None:
        await drained(replica.replica_id, self._load, self._drain_grace_s)
        await self._stop_forgotten(dep, replica)
        self._wake.set()

    async def _stop_forgotten(self, dep: _Deployment, replica: _Replica) -> None:
        await self._stop(replica, self._stop_grace_s)
        dep.replicas.pop(replica.replica_id, None)
        log.info("replica %s stopped (%s)", replica.replica_id, "removed" if dep.removed else "scaled down")

    async def _give_up_on(self, dep: _Deployment, replica: _Replica) -> None:
        """Stop a replica the plan gave up on (see ``reconcile_plan``); it is restarted after backoff."""
        reason = given_up(dep.spec, replica, self._unhealthy_checks)
        code = await self._stop(replica, self._stop_grace_s)
        self._mark_dead(replica, code, reason)

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop every replica process (SIGTERM, then SIGKILL after ``grace_s``); the controller is done."""
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
        async with self._lock:
            self._closed = True
            replicas = [r for dep in self._deployments.values() for r in dep.replicas.values()]
            for replica in replicas:
                replica.state = ReplicaState.STOPPING
            results = await asyncio.gather(
                *(self._stop(r, grace_s) for r in replicas), return_exceptions=True
            )
            for replica, result in zip(replicas, results, strict=True):
                if isinstance(result, BaseException):
                    log.error("stopping replica %s failed: %s", replica.replica_id, result)
            self._deployments.clear()
        self._notify_changed()
