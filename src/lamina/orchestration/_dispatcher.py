"""Sends each request to a ready replica of its deployment, and fails over when a replica vanishes.

A transport failure (the replica died or its port closed) takes the replica out of rotation at once and
the request goes again to another ready replica, waiting for one (a restart) while the retry deadline
allows. What a replica answers, error statuses included, is returned as it is: the replica spoke, so
there is nothing to fail over from. Requests are never refused for load: each goes to the least-loaded
ready replica and queues there.

A request that was on a replica when its process exited may be what killed it (a prompt that crashes the
engine). Replaying such a request on every replica would take the whole deployment down, again and again,
so a request that two replicas died serving is failed with :class:`~lamina.errors.PoisonRequestError`.
"Died" means the controller saw the process exit (or restarted it); a transport error from a process
that is still running, or a refused connection (the request never reached the replica), is a plain retry.
Each request carries the secret of the replica it goes to (see ``_handshake``). During a canary rollout,
the target version's replicas get the rollout's weight of the requests, and each answer is reported to
the rollout's judge (its status and latency: the automatic rollback).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from lamina.errors import NoReadyReplicaError, PoisonRequestError
from lamina.orchestration._controller import Controller
from lamina.orchestration._handshake import SECRET_HEADER, ReplicaSecrets
from lamina.orchestration._policy import ReplicaLoad, pick_replica
from lamina.orchestration._workload import ReplicaState, ReplicaStatus

#: failures that mean the replica is gone (dead, restarting, port closed), so the request never ran to
#: completion there and may go to another replica. A ReadTimeout is not one: the replica may be busy.
RETRYABLE_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
#: failures before the request reached the replica: it cannot have crashed it
NOT_SENT_ERRORS: tuple[type[httpx.TransportError], ...] = (httpx.ConnectError, httpx.ConnectTimeout)
#: replicas that may die serving one request before it is failed instead of retried
POISON_AFTER_DEATHS = 2
#: reconcile steps to wait for the controller to tell whether a failed replica's process exited
_DEATH_CHECK_STEPS = 4


class _SecretUnknownError(httpx.TransportError):
    """No live replica reported the chosen URL any more (it exited since it was picked)."""


#: what ``request`` and ``stream`` fail over from
FAILOVER_ERRORS: tuple[type[httpx.TransportError], ...] = (*RETRYABLE_ERRORS, _SecretUnknownError)


@dataclass(frozen=True)
class DispatchResult:
    """A replica's answer and where it came from, for the caller's trace span.

    ``attempts`` is 1 when the first replica answered; each failover adds one. For ``stream`` the
    response is open and streaming; the context manager closes it.
    """

    response: httpx.Response
    replica_id: str
    url: str
    attempts: int


class ReplicaClient(Protocol):
    """The HTTP client the dispatcher sends with: :class:`~lamina.orchestration._http1.Http1Client` in
    the stack, any ``httpx.AsyncClient`` too."""

    async def post(
        self, url: str, *, json: Any = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response: ...

    def stream(
        self, method: str, url: str, *, json: Any = None, headers: Mapping[str, str] | None = None
    ) -> AbstractAsyncContextManager[httpx.Response]: ...

    async def aclose(self) -> None: ...


class Dispatcher:
    """Routes requests of each deployment over the controller's ready replicas; ``secrets`` is the backend
    that started them, which knows each one's secret."""

    def __init__(
        self,
        controller: Controller,
        http: ReplicaClient,
        secrets: ReplicaSecrets,
        *,
        retry_deadline_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        poll_interval_s: float = 0.25,
    ) -> None:
        self._controller = controller
        self._http = http
        self._secrets = secrets
        self._retry_deadline_s = retry_deadline_s
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._in_flight: Counter[str] = Counter()
        self._picks = 0

    async def aclose(self) -> None:
        """Close the connections to the replicas (the client given, which this dispatcher owns)."""
        await self._http.aclose()

    def in_flight(self) -> dict[str, int]:
        """Requests this dispatcher has open, by replica id."""
        return {rid: n for rid, n in self._in_flight.items() if n > 0}

    async def request(
        self,
        deployment: str,
        path: str,
        json_body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
        version: str | None = None,
    ) -> DispatchResult:
        """POST ``json_body`` to ``path`` on a ready replica and read the whole answer; with ``version``
        (a model ``name@version``), on a replica running it (during a rollout, its group only).

        Raises ModelNotFoundError for an unknown deployment, NoReadyReplicaError when no replica could
        answer before the retry deadline, and PoisonRequestError once two replicas died serving it.
        """
        attempt = _Attempts(deployment, self._clock() + self._retry_deadline_s, version=version)
        while True:
            replica = await self._acquire(attempt)
            assert replica.url is not None
            sent = self._clock()
            try:
                with self._counted(replica.replica_id):
                    response = await self._http.post(
                        replica.url + path, json=dict(json_body), headers=self._headers(replica, headers)
                    )
            except FAILOVER_ERRORS as exc:
                await self._failed(attempt, replica, exc)
                continue
            self._observe(deployment, replica, response.status_code, sent)
            return DispatchResult(response, replica.replica_id, replica.url, attempt.count)

    @asynccontextmanager
    async def stream(
        self,
        deployment: str,
        path: str,
        json_body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[DispatchResult]:
        """POST and yield the response as it streams; failures before its headers arrive fail over.

        Once the response headers are in, bytes may already have gone to the client, so a later
        failure is raised to the caller (an ``httpx.TransportError`` from iterating the body).
        """
        attempt = _Attempts(deployment, self._clock() + self._retry_deadline_s)
        while True:
            replica = await self._acquire(attempt)
            assert replica.url is not None
            sent = self._clock()
            with self._counted(replica.replica_id):
                async with contextlib.AsyncExitStack() as opened:
                    try:
                        response = await opened.enter_async_context(
                            self._http.stream(
                                "POST",
                                replica.url + path,
                                json=dict(json_body),
                                headers=self._headers(replica, headers),
                            )
                        )
                    except FAILOVER_ERRORS as exc:
                        await self._failed(attempt, replica, exc)
                        continue
                    self._observe(deployment, replica, response.status_code, sent)
                    yield DispatchResult(response, replica.replica_id, replica.url, attempt.count)
                    return

    def _headers(self, replica: ReplicaStatus, headers: Mapping[str, str] | None) -> dict[str, str]:
        """The caller's headers plus the replica's secret (raises _SecretUnknownError once it is gone)."""
        assert replica.url is not None
        secret = self._secrets.secret_for(replica.url)
        if secret is None:
            raise _SecretUnknownError(f"{replica.replica_id} at {replica.url} is no longer running")
        return {**(headers or {}), SECRET_HEADER: secret}

    def _observe(self, deployment: str, replica: ReplicaStatus, status: int, sent: float) -> None:
        """Tell a running rollout (its canary judge) how the replica answered."""
        control = self._controller.rollout(deployment)
        if control is not None:
            now = self._clock()
            control.observe(replica.version, status, now - sent, now)

    @contextmanager
    def _counted(self, replica_id: str) -> Iterator[None]:
        self._in_flight[replica_id] += 1
        try:
            yield
        finally:
            self._in_flight[replica_id] -= 1
            if self._in_flight[replica_id] <= 0:
                del self._in_flight[replica_id]

    async def _acquire(self, attempt: _Attempts) -> ReplicaStatus:
        """The least-loaded ready replica, waiting for one until the deadline."""
        while True:
            ready = self._controller.ready_replicas(attempt.deployment)
            control = self._controller.rollout(attempt.deployment)
            if ready and control is not None:
                ready = control.route(ready, attempt.version)  # a canary's share, or the version asked
            if ready:
                loads = [ReplicaLoad(r.replica_id, self._in_flight[r.replica_id]) for r in ready]
                chosen = pick_replica(loads, self._picks)
                self._picks += 1
                attempt.count += 1
                return next(r for r in ready if r.replica_id == chosen)
            remaining = attempt.deadline - self._clock()
            if remaining <= 0:
                raise self._no_replica(attempt)
            await self._controller.wait_for_change(min(remaining, self._poll_interval_s))

    async def _failed(self, attempt: _Attempts, replica: ReplicaStatus, exc: httpx.TransportError) -> None:
        """Take the replica out of rotation; fail the request if it was the second to die serving it."""
        reason = f"{type(exc).__name__} from {replica.url}: {exc}"
        attempt.failures.append(f"{replica.replica_id}: {type(exc).__name__}")
        self._controller.report_failure(replica.replica_id, reason)
        sent = not isinstance(exc, (*NOT_SENT_ERRORS, _SecretUnknownError))
        if sent and await self._died(attempt.deployment, replica):
            attempt.deaths.append(replica.replica_id)
            if len(attempt.deaths) >= POISON_AFTER_DEATHS:
                raise self._poison(attempt) from exc
        if self._clock() >= attempt.deadline:
            raise self._no_replica(attempt) from exc

    async def _died(self, deployment: str, sent_to: ReplicaStatus) -> bool:
        """Whether the process that ``sent_to`` was exited: the controller, woken by ``report_failure``,
        marks it dead (or has restarted it, with a new pid) within a step or two. A replica back in
        rotation with the same pid, or one still running after those steps, did not die."""
        for _ in range(_DEATH_CHECK_STEPS):
            now = next(
                (
                    r
                    for d in self._controller.status()
                    if d.name == deployment
                    for r in d.replicas
                    if r.replica_id == sent_to.replica_id
                ),
                None,
            )
            if now is None or (now.state is ReplicaState.READY and now.pid == sent_to.pid):
                return False
            if now.state is ReplicaState.DEAD or now.pid != sent_to.pid:
                return True
            await self._controller.wait_for_change(self._poll_interval_s)
        return False

    def _poison(self, attempt: _Attempts) -> PoisonRequestError:
        replicas = ", ".join(attempt.deaths)
        return PoisonRequestError(
            f"this request crashed {len(attempt.deaths)} replicas of {attempt.deployment!r} ({replicas}): "
            "their processes exited while serving it, so it was not retried further (it would take every "
            "replica down). The replicas' logs (see `lamina status`) show the crash; change the request, "
            "or fix or change the engine, before sending it again.",
            deployment=attempt.deployment,
            replicas=list(attempt.deaths),
        )

    def _no_replica(self, attempt: _Attempts) -> NoReadyReplicaError:
        failed = f" after {len(attempt.failures)} failed attempt(s) ({', '.join(attempt.failures)})"
        return NoReadyReplicaError(
            f"no ready replica of {attempt.deployment!r} within {self._retry_deadline_s:g} s"
            f"{failed if attempt.failures else ''}: {self._controller.explain(attempt.deployment)}. "
            "Check `lamina status` and the replica's log for the cause.",
            deployment=attempt.deployment,
            attempts=attempt.count,
        )


@dataclass
class _Attempts:
    """One request's tries so far."""

    deployment: str
    deadline: float
    #: the model version the request must be answered by (None: any)
    version: str | None = None
    count: int = 0
    failures: list[str] = field(default_factory=list)
    #: replicas whose process exited while this request was on them
    deaths: list[str] = field(default_factory=list)
