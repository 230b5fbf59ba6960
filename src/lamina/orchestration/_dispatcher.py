"""Sends each request to a ready replica of its deployment, and fails over when a replica vanishes.

A transport failure (the replica died or its port closed) takes the replica out of rotation at once and
the request goes again to another ready replica, waiting for one (a restart) while the retry deadline
allows. What a replica answers, error statuses included, is returned as it is: the replica spoke, so
there is nothing to fail over from. Requests are never refused for load: each goes to the least-loaded
ready replica and queues there.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from lamina.errors import NoReadyReplicaError
from lamina.orchestration._controller import Controller
from lamina.orchestration._policy import ReplicaLoad, pick_replica
from lamina.orchestration._workload import ReplicaStatus

#: failures that mean the replica is gone (dead, restarting, port closed), so the request never ran to
#: completion there and may go to another replica. A ReadTimeout is not one: the replica may be busy.
RETRYABLE_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


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


class Dispatcher:
    """Routes requests of each deployment over the controller's ready replicas."""

    def __init__(
        self,
        controller: Controller,
        http: httpx.AsyncClient,
        *,
        retry_deadline_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        poll_interval_s: float = 0.25,
    ) -> None:
        self._controller = controller
        self._http = http
        self._retry_deadline_s = retry_deadline_s
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._in_flight: Counter[str] = Counter()
        self._picks = 0

    def in_flight(self) -> dict[str, int]:
        """Requests this dispatcher has open, by replica id."""
        return {rid: n for rid, n in self._in_flight.items() if n > 0}

    async def request(
        self,
        deployment: str,
        path: str,
        json_body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> DispatchResult:
        """POST ``json_body`` to ``path`` on a ready replica and read the whole answer.

        Raises ModelNotFoundError for an unknown deployment and NoReadyReplicaError when no replica could
        answer before the retry deadline.
        """
        attempt = _Attempts(deployment, self._clock() + self._retry_deadline_s)
        while True:
            replica = await self._acquire(attempt)
            assert replica.url is not None
            try:
                with self._counted(replica.replica_id):
                    response = await self._http.post(
                        replica.url + path, json=dict(json_body), headers=dict(headers or {})
                    )
            except RETRYABLE_ERRORS as exc:
                self._failed(attempt, replica, exc)
                continue
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
            with self._counted(replica.replica_id):
                request = self._http.build_request(
                    "POST", replica.url + path, json=dict(json_body), headers=dict(headers or {})
                )
                try:
                    response = await self._http.send(request, stream=True)
                except RETRYABLE_ERRORS as exc:
                    self._failed(attempt, replica, exc)
                    continue
                try:
                    yield DispatchResult(response, replica.replica_id, replica.url, attempt.count)
                finally:
                    await response.aclose()
                return

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

    def _failed(self, attempt: _Attempts, replica: ReplicaStatus, exc: httpx.TransportError) -> None:
        reason = f"{type(exc).__name__} from {replica.url}: {exc}"
        attempt.failures.append(f"{replica.replica_id}: {type(exc).__name__}")
        self._controller.report_failure(replica.replica_id, reason)
        if self._clock() >= attempt.deadline:
            raise self._no_replica(attempt) from exc

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
    count: int = 0
    failures: list[str] = field(default_factory=list)
