"""What every guard is: ``check(text)`` gives a :class:`Decision` with the :class:`Finding` behind it.

A guard finds things in a text (a credit card number, an injection attempt, a word from a list, an answer
too long); what it then does is configured per guard: ``block`` the request or answer, ``redact`` the
findings (the decision carries the new text) or ``flag`` it (the text goes on, the decision is recorded).
A guard that found nothing allows. ``run_chain`` runs the guards of a call under their timeouts, off
the event loop, and turns a guard that raises or overruns into a decision too: fail open (allow,
recorded as an error) or fail closed (block), as configured. A guard failing never fails the request in
any other way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import anyio

log = logging.getLogger("lamina.guards")

Action = Literal["block", "redact", "flag"]
Verdict = Literal["allow", "block", "redact", "flag"]
Direction = Literal["input", "output"]

#: entity names of the findings a failing guard reports (never a secret: safe to show the client)
GUARD_ERROR = "GUARD_ERROR"
GUARD_TIMEOUT = "GUARD_TIMEOUT"
#: the longest text a cheap guard checks on the event loop rather than in a worker thread
INLINE_CHARS = 2000


@dataclass(frozen=True)
class Finding:
    """One thing a guard found: its type, how sure it is (0..1) and where it is in the text."""

    entity: str
    score: float
    start: int
    end: int


@dataclass(frozen=True)
class Decision:
    """What a guard decided about one text."""

    guard: str
    verdict: Verdict
    findings: tuple[Finding, ...] = ()
    #: the redacted text (verdict ``redact`` only)
    text: str | None = None
    #: the guard failed (raised or timed out) and this is its fail-open or fail-closed decision
    failed: bool = False
    seconds: float = 0.0

    @property
    def entities(self) -> list[str]:
        """The finding types, each once, in order of first appearance."""
        return list(dict.fromkeys(f.entity for f in self.findings))


class Guard(Protocol):
    """A check of one text; ``check`` is plain CPU work, run in a worker thread by ``run_guard``."""

    @property
    def name(self) -> str: ...

    @property
    def settings(self) -> GuardSettings: ...

    def check(self, text: str) -> Decision: ...


@dataclass(frozen=True)
class GuardSettings:
    """How a guard acts on what it finds, and what happens when it cannot decide."""

    action: Action = "block"
    #: a guard that raises or overruns its timeout allows (True) or blocks (False)
    fail_open: bool = False
    timeout_s: float = 0.5
    #: principals (key names or key ids) this guard does not apply to
    exempt: frozenset[str] = field(default_factory=frozenset)


class FindingGuard:
    """The common part of a guard: findings in, decision out (subclasses implement ``find``)."""

    #: whether ``redact`` is a meaningful action for this guard (a classifier's verdict is not a span)
    can_redact = True

    def __init__(self, name: str, settings: GuardSettings) -> None:
        if settings.action == "redact" and not self.can_redact:
            raise ValueError(
                f"the guard {name!r} cannot redact (it judges the whole text); "
                "set its action to block or flag"
            )
        self._name = name
        self._settings = settings

    @property
    def name(self) -> str:
        return self._name

    @property
    def settings(self) -> GuardSettings:
        return self._settings

    def find(self, text: str) -> list[Finding]:
        raise NotImplementedError

    def cheap(self, text: str) -> bool:
        """Whether checking ``text`` is quick enough for the event loop (see ``run_chain``): patterns and
        word lists on a text of at most ``INLINE_CHARS``; subclasses that do more narrow it."""
        return len(text) <= INLINE_CHARS

    def check(self, text: str) -> Decision:
        findings = self.find(text)
        if not findings:
            return Decision(self._name, "allow")
        action = self._settings.action
        if action == "redact":
            return Decision(self._name, "redact", tuple(findings), text=redact(text, findings))
        return Decision(self._name, action, tuple(findings))


def placeholder(entity: str) -> str:
    return f"<{entity}>"


def redact(text: str, findings: Sequence[Finding]) -> str:
    """``text`` with each finding replaced by ``<ENTITY>``; overlapping findings merge into the first."""
    out: list[str] = []
    pos = 0
    for f in sorted(findings, key=lambda f: (f.start, -f.end)):
        if f.end <= pos:
            continue
        out.append(text[pos : max(f.start, pos)])
        if f.start >= pos:
            out.append(placeholder(f.entity))
        pos = f.end
    out.append(text[pos:])
    return "".join(out)


async def run_guard(guard: Guard, texts: Sequence[str], limiter: anyio.CapacityLimiter) -> list[Decision]:
    """``guard.check`` on each of ``texts`` in a worker thread, under the guard's timeout."""
    return (await run_chain([guard], texts, limiter))[0]


async def run_chain(
    guards: Sequence[Guard], texts: Sequence[str], limiter: anyio.CapacityLimiter, *, chained: bool = True
) -> list[list[Decision]]:
    """Each guard's decisions on ``texts``, the guards one after another in one worker thread (one thread
    hop per call rather than one per guard: the hop costs more CPU than most guards).

    With ``chained``, each guard sees the texts as the guards before it redacted them, and the chain stops
    at the first block (the guards after it get no decisions). A guard that raises gets its failure
    decision, and so does one that took longer than its timeout (its verdict is discarded). One that hangs
    is abandoned when the chain's time is up (the sum of the timeouts of the guards still to run), and
    the guards after it run in a new worker thread.

    When every guard says its check of every text is cheap (``cheap(text)``: pattern and word-list work on
    a short text, no model inference and no Presidio analysis), the chain runs on the event loop instead:
    a thread hop costs about as much CPU as those checks (0.01 to 0.06 ms for a prompt of 150 to 900
    characters). Their timeouts still turn an overrun into its failure decision. A guard without
    ``cheap`` always runs in the thread.
    """
    if all(_cheap(guard, text) for guard in guards for text in texts):  # the hop would cost more
        inline = _Chain(list(guards), list(texts), chained)
        inline.run()
        return inline.results
    out: list[list[Decision]] = []
    current, remaining = list(texts), list(guards)
    while remaining:
        chain = _Chain(remaining, current, chained)
        budget = sum(g.settings.timeout_s for g in remaining)
        try:
            with anyio.fail_after(budget):
                await anyio.to_thread.run_sync(chain.run, abandon_on_cancel=True, limiter=limiter)
        except TimeoutError:
            at = chain.at  # read first: the results of the guards before it are complete
            hung = remaining[at]
            log.warning("guard %s overran its timeout of %.0f ms", hung.name, hung.settings.timeout_s * 1000)
            out += [*chain.results[:at], [_failed(hung, GUARD_TIMEOUT, budget)] * len(current)]
            if chained and not hung.settings.fail_open:
                return out
            current, remaining = chain.snapshots[at], remaining[at + 1 :]
            continue
        return out + chain.results
    return out


class _Chain:
    """The guards of one call as one worker thread runs them (see ``run_chain``)."""

    def __init__(self, guards: Sequence[Guard], texts: list[str], chained: bool) -> None:
        self.guards = list(guards)
        self.texts = list(texts)
        self.chained = chained
        self.results: list[list[Decision]] = []
        #: the texts as each guard got them, and the guard running now
        self.snapshots: list[list[str]] = []
        self.at = 0

    def run(self) -> None:
        for i, guard in enumerate(self.guards):
            self.snapshots.append(list(self.texts))
            self.at = i
            decisions = _checked(guard, self.texts)
            self.results.append(decisions)
            if not self.chained:
                continue
            top = worst(decisions)
            if top is not None and top.verdict == "block":
                return
            for j, decision in enumerate(decisions):
                if decision.verdict == "redact" and decision.text is not None:
                    self.texts[j] = decision.text
        self.at = len(self.guards)


def _cheap(guard: Guard, text: str) -> bool:
    cheap = getattr(guard, "cheap", None)
    return bool(cheap(text)) if callable(cheap) else False


def _checked(guard: Guard, texts: Sequence[str]) -> list[Decision]:
    started = time.perf_counter()
    out = []
    try:
        for text in texts:
            begun = time.perf_counter()
            d = guard.check(text)
            out.append(Decision(d.guard, d.verdict, d.findings, d.text, seconds=time.perf_counter() - begun))
    except Exception:
        log.exception("guard %s failed", guard.name)
        return [_failed(guard, GUARD_ERROR, time.perf_counter() - started)] * len(texts)
    elapsed = time.perf_counter() - started
    if elapsed > guard.settings.timeout_s:
        log.warning("guard %s took %.0f ms, over its timeout", guard.name, elapsed * 1000)
        return [_failed(guard, GUARD_TIMEOUT, elapsed)] * len(texts)
    return out


def _failed(guard: Guard, entity: str, seconds: float) -> Decision:
    verdict: Verdict = "allow" if guard.settings.fail_open else "block"
    return Decision(guard.name, verdict, (Finding(entity, 1.0, 0, 0),), failed=True, seconds=seconds)


_SEVERITY = {"allow": 0, "flag": 1, "redact": 2, "block": 3}


def worst(decisions: Sequence[Decision]) -> Decision | None:
    """The most severe of ``decisions`` (block over redact over flag over allow), None for none."""
    return max(decisions, key=lambda d: (_SEVERITY[d.verdict], d.failed), default=None)
