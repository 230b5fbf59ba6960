"""Model groups at the gateway: picking a member per request, retrying and falling back, plain and streamed.

:class:`ModelRouter` keeps what the strategies read (this gateway's requests in flight per member, an
EWMA of each member's latency, prices from the composition root) and asks the models layer's pure
``rank_members``/``plan_tries`` for the order of tries. A name that is not a group costs one dict lookup.

A try fails on a replica's 5xx or 429, on a dispatcher error of that kind (no ready replica), and on
overrunning the group's ``timeout_s``; the next try waits a doubling backoff, and all of them together keep
to ``deadline_s``. A 4xx other than 429 is the client's problem and is answered at once. Every try is a
span ``attempt`` (layer models) under the request; the member that answered is the answer's ``model`` and
its ``x-lamina-model`` header.
Streams: :class:`~lamina.application._fallback_stream.FallbackStream`.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import anyio
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue
from starlette.responses import Response

from lamina.application._ports import ModelCatalog, Readiness, Route
from lamina.application._relay import Forward
from lamina.application._tracing import Exchange
from lamina.config import ModelGroupConfig
from lamina.errors import LaminaError, UpstreamTimeoutError
from lamina.models import (
    Classifier,
    Features,
    LatencyTracker,
    MemberStats,
    ModelCard,
    plan_tries,
    rank_members,
    retry_backoff_s,
)
from lamina.observability import LAYER, Layer, Telemetry

T = TypeVar("T")
_ERROR = re.compile(rb'"error"\s*:')
_EVENT_END = b"\n\n"
_DONE = b"data: [DONE]\n\n"


def retryable(status: int) -> bool:
    """Whether an answer with this status may go to another member: server-side failures and 429."""
    return status >= 500 or status == 429


class ModelRouter:
    """The gateway's model groups (see the module doc); built by the composition root."""

    def __init__(
        self,
        groups: Sequence[ModelGroupConfig],
        catalog: ModelCatalog,
        telemetry: Telemetry,
        readiness: Readiness,
        *,
        cost_of: Callable[[str], float | None] = lambda _member: None,
        classifiers: Mapping[str, Classifier] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.groups = {g.name: g for g in groups}
        self._catalog = catalog
        self._telemetry = telemetry
        self._readiness = readiness
        self._cost_of = cost_of
        self._classifiers = dict(classifiers or {})
        self._rng = rng or random.Random()
        self._clock = clock
        self.in_flight: Counter[str] = Counter()
        self.latency = LatencyTracker(clock)
        self.catalog = GroupCatalog(catalog, self)

    def stats(self) -> dict[str, MemberStats]:
        ready = self._readiness()
        members = {m.deployment for g in self.groups.values() for m in g.members}
        return {
            m: MemberStats(self.in_flight[m], self.latency.latency(m), self._cost_of(m), bool(ready.get(m)))
            for m in members
        }

    def tries(self, name: str, body: Mapping[str, object], headers: Mapping[str, str]) -> Tries | None:
        """The tries of a request for ``name`` (span ``route``, layer models); None when it is no group."""
        group = self.groups.get(name)
        if group is None:
            return None
        with self._telemetry.span("route", Layer.MODELS, {"gen_ai.request.model": name}) as span:
            stats, features = self.stats(), Features.of(body, headers)
            classifier = self._classifiers.get(name)
            members = plan_tries(
                name, self.groups, lambda g: rank_members(g, stats, features, self._rng, classifier)
            )
            span.set_attribute("lamina.group.strategy", group.strategy)
            span.set_attribute("lamina.group.tries", members)
            span.set_attribute("lamina.deployment", members[0])
        return Tries(self, group, members, self._clock() + group.deadline_s)

    def route(self, member: str) -> Route:
        return self._catalog.resolve(member)

    @contextmanager
    def attempt(self, member: str, number: int) -> Iterator[trace.Span]:
        """A try on ``member``: counted in flight, and a span of its own."""
        attrs: dict[str, AttributeValue] = {
            LAYER: Layer.MODELS.value,
            "lamina.deployment": member,
            "lamina.attempt": number,
        }
        self.in_flight[member] += 1
        try:
            with self._telemetry.tracer.start_as_current_span("attempt", attributes=attrs) as span:
                yield span
        finally:
            self.in_flight[member] -= 1


class Tries:
    """One request's members to try, in order, under its group's deadline."""

    def __init__(self, router: ModelRouter, group: ModelGroupConfig, members: list[str], deadline: float):
        self.router = router
        self.group = group
        self.members = members
        self.deadline = deadline
        self.route = router.route(members[0])
        #: the group as the key checks see it: a key must be allowed the group's name, not one member's
        self.asked: Route = _GroupRoute(group.name, group.name, None, self.route.capabilities)

    def _forward(self, member: str, fwd: Forward) -> Forward:
        return Forward(member, fwd.path, {**fwd.body, "model": self.router.route(member).served_name})

    async def _pause(self, number: int) -> bool:
        """Wait before try ``number`` (0: the first, no wait); False when the deadline leaves no time."""
        pause = 0.0 if number == 0 else retry_backoff_s(number)
        if self.router._clock() + pause >= self.deadline:
            return False
        await anyio.sleep(pause)
        return True

    def _limit(self) -> float:
        left = self.deadline - self.router._clock()
        return left if self.group.timeout_s is None else min(left, self.group.timeout_s)

    async def plain(
        self,
        fwd: Forward,
        exchange: Exchange,
        call_headers: dict[str, str],
        once: Callable[[Forward], Awaitable[T]],
    ) -> T | Response:
        """``once`` on each member until one answers; an error answer (a Response) of a retryable status or
        a retryable LaminaError moves on. The last failure is returned (or raised) when none answers."""
        last: Response | LaminaError | None = None
        for number, member in enumerate(self.members):
            if not await self._pause(number):
                break
            started = time.perf_counter()
            with self.router.attempt(member, number + 1) as span:
                try:
                    with anyio.fail_after(self._limit()):
                        answer = await once(self._forward(member, fwd))
                except TimeoutError:
                    last = UpstreamTimeoutError(
                        f"{member} did not answer within {self._limit_text()}; the next member was tried"
                    )
                    tried_next(span, last.status)
                    continue
                except LaminaError as exc:
                    if not retryable(exc.status):
                        raise
                    last = exc
                    tried_next(span, exc.status)
                    continue
                if isinstance(answer, Response) and retryable(answer.status_code):
                    last = answer
                    tried_next(span, answer.status_code)
                    continue
            self.router.latency.record(member, time.perf_counter() - started)
            call_headers["x-lamina-model"] = member
            recovered(exchange, number)
            return answer
        if isinstance(last, LaminaError) or last is None:
            raise last or UpstreamTimeoutError(f"no member of {self.group.name!r} could be tried in time")
        return last

    def _limit_text(self) -> str:
        return f"{self.group.timeout_s:g} s" if self.group.timeout_s else "the group's deadline_s"


def tried_next(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"HTTP {status}: tried the next member"))


def recovered(exchange: Exchange, failed_tries: int) -> None:
    if failed_tries:
        exchange.outcome = None
        exchange.span.set_attribute("lamina.fallback.failed_tries", failed_tries)
        exchange.span.set_status(trace.Status(trace.StatusCode.OK))


@dataclass(frozen=True)
class _GroupRoute:
    deployment: str
    served_name: str
    model_version: str | None
    capabilities: frozenset[str]


@dataclass(frozen=True)
class GroupCatalog:
    """The catalog with the groups listed as models (a group resolves to its first member)."""

    inner: ModelCatalog
    router: ModelRouter

    def models(self) -> list[ModelCard]:
        cards = self.inner.models()
        by_id = {c.id: c for c in cards}
        for group in self.router.groups.values():
            members = [by_id[m.deployment] for m in group.members if m.deployment in by_id]
            shared = set.intersection(*(set(c.capabilities) for c in members)) if members else set()
            cards.append(
                ModelCard(
                    id=group.name,
                    created=min((c.created for c in members), default=0),
                    capabilities=sorted(shared),
                    ready=any(c.ready for c in members),
                )
            )
        return cards

    def resolve(self, name: str) -> Route:
        group = self.router.groups.get(name)
        return self.inner.resolve(group.members[0].deployment if group is not None else name)
