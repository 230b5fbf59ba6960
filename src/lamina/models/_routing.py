"""Routing between models: which member of a model group serves a request, and what is tried after it.

Pure decisions over a frozen view of the members (:class:`MemberStats`) and of the request
(:class:`Features`); the gateway gathers both, applies the decision and keeps the numbers the strategies
read (its own requests in flight, a :class:`LatencyTracker` per member). :func:`rank_members` orders a group's
members, best first, by its strategy; :func:`plan_tries` expands that order into every try of a request: the
group's own members (the first pick and ``retries`` more), then each fallback (a deployment, or another
group's ranked members), without repeats. Members without a ready replica go last, so they are tried only
when nothing else is left.

Strategies:

- ``least_busy``: fewest requests in flight (ties: declared order).
- ``lowest_latency``: lowest EWMA of recent latency; a member never measured, or not measured for
  ``explore_after_s``, goes first so it is (re)measured: without that, a member that was slow once would
  never be tried again.
- ``lowest_cost``: lowest USD per million tokens (unknown costs last).
- ``weighted``: random by weight (the caller's ``random.Random``, seeded in tests); the rest by weight.
- ``rules``: the first rule whose conditions all hold; no match: declared order.
- ``classifier``: a callable from the request's features to a member (:class:`KeywordClassifier` is the
  built-in one; the composition root may plug in another, e.g. an embedding-centroid classifier).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lamina.config import ModelGroupConfig, RoutingRuleConfig


@dataclass(frozen=True)
class Features:
    """What routing rules and classifiers may look at in a request."""

    #: the request's text: every message's content, or the prompt / inputs
    text: str = ""
    has_tools: bool = False
    #: ``response_format.type`` (text, json_object, json_schema), None when absent
    response_format: str | None = None
    #: the request's ``metadata`` object, then its ``x-lamina-meta-*`` headers (lower-case names)
    metadata: Mapping[str, str] = field(default_factory=dict)

    @staticmethod
    def of(body: Mapping[str, object], headers: Mapping[str, str] = {}) -> Features:
        """From a request's JSON body and its headers."""
        texts: list[str] = []
        messages = body.get("messages")
        if isinstance(messages, list):
            for m in messages:
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, str):
                    texts.append(content)
                elif isinstance(content, list):
                    texts += [
                        p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
                    ]
        else:
            prompt = body.get("prompt", body.get("input", ""))
            texts += [prompt] if isinstance(prompt, str) else [p for p in _list(prompt) if isinstance(p, str)]
        meta = {
            k.removeprefix("x-lamina-meta-"): v for k, v in headers.items() if k.startswith("x-lamina-meta-")
        }
        raw = body.get("metadata")
        if isinstance(raw, dict):
            meta |= {str(k): str(v) for k, v in raw.items()}
        fmt = body.get("response_format")
        return Features(
            text="\n".join(texts),
            has_tools=bool(body.get("tools")),
            response_format=str(fmt.get("type")) if isinstance(fmt, dict) and fmt.get("type") else None,
            metadata=meta,
        )


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


@dataclass(frozen=True)
class MemberStats:
    """What the gateway knows of one member now."""

    in_flight: int = 0
    #: EWMA of recent latency in seconds; None: not measured (recently)
    latency_s: float | None = None
    #: USD per million tokens; None: unknown
    cost: float | None = None
    ready: bool = True


#: a classifier: the request's features -> the member that should serve it (None: no opinion)
Classifier = Callable[[Features], str | None]


def rule_matches(rule: RoutingRuleConfig, features: Features) -> bool:
    """Whether every condition of ``rule`` holds for the request."""
    size = len(features.text)
    return (
        (rule.min_prompt_chars is None or size >= rule.min_prompt_chars)
        and (rule.max_prompt_chars is None or size <= rule.max_prompt_chars)
        and (rule.has_tools is None or rule.has_tools == features.has_tools)
        and (rule.response_format is None or rule.response_format == features.response_format)
        and all(features.metadata.get(k) == v for k, v in rule.metadata.items())
    )


class KeywordClassifier:
    """The member whose words occur most often in the request's text (whole words, case-insensitive);
    None when no word occurs."""

    def __init__(self, keywords: Mapping[str, Sequence[str]]) -> None:
        self._patterns = {
            member: re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
            for member, words in keywords.items()
            if words
        }

    def __call__(self, features: Features) -> str | None:
        hits = {m: len(p.findall(features.text)) for m, p in self._patterns.items()}
        best = max(hits, key=lambda m: hits[m], default=None)
        return best if best is not None and hits[best] > 0 else None


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _first(members: list[str], chosen: str | None) -> list[str]:
    return [chosen, *(m for m in members if m != chosen)] if chosen in members else members


def rank_members(
    group: ModelGroupConfig,
    stats: Mapping[str, MemberStats],
    features: Features,
    rng: random.Random,
    classifier: Classifier | None = None,
) -> list[str]:
    """The group's members, best first by its strategy; members with no ready replica last."""
    members = [m.deployment for m in group.members]
    of = {m: stats.get(m, MemberStats()) for m in members}
    if group.strategy == "least_busy":
        order = sorted(members, key=lambda m: of[m].in_flight)
    elif group.strategy == "lowest_latency":
        order = sorted(members, key=lambda m: _or(of[m].latency_s, -math.inf))
    elif group.strategy == "lowest_cost":
        order = sorted(members, key=lambda m: _or(of[m].cost, math.inf))
    elif group.strategy == "weighted":
        weights = {m.deployment: m.weight for m in group.members}
        pick = rng.choices(members, weights=[weights[m] for m in members])[0]
        order = _first(sorted(members, key=lambda m: -weights[m]), pick)
    elif group.strategy == "rules":
        match = next((r.member for r in group.rules if rule_matches(r, features)), None)
        order = _first(members, match)
    else:
        choose = classifier if classifier is not None else KeywordClassifier(group.keywords)
        order = _first(members, choose(features))
    return sorted(order, key=lambda m: not of[m].ready)  # stable: the strategy's order within each part


def plan_tries(
    name: str,
    groups: Mapping[str, ModelGroupConfig],
    ranked: Callable[[ModelGroupConfig], list[str]],
) -> list[str]:
    """Every deployment to try for the model ``name``, in order: its own ranked members (the first pick
    and ``retries`` more), then each fallback's (a deployment as itself, a group by its own plan)."""
    tries: list[str] = []
    pending, seen = [name], set()
    while pending:
        current = pending.pop(0)
        if current in seen:
            continue
        seen.add(current)
        group = groups.get(current)
        if group is None:
            tries.append(current)
            continue
        tries += ranked(group)[: group.retries + 1]
        pending = [*group.fallbacks, *pending]
    return list(dict.fromkeys(tries))


class LatencyTracker:
    """An exponentially weighted moving average of each member's latency, on an injected clock.

    ``alpha`` weighs the newest sample; a member without a sample for ``explore_after_s`` reads as
    unmeasured again (see the module doc)."""

    def __init__(
        self, clock: Callable[[], float], *, alpha: float = 0.3, explore_after_s: float = 60.0
    ) -> None:
        self._clock = clock
        self._alpha = alpha
        self._explore_after_s = explore_after_s
        self._values: dict[str, tuple[float, float]] = {}

    def record(self, member: str, seconds: float) -> None:
        old = self._values.get(member)
        value = seconds if old is None else self._alpha * seconds + (1 - self._alpha) * old[0]
        self._values[member] = (value, self._clock())

    def latency(self, member: str) -> float | None:
        entry = self._values.get(member)
        if entry is None or self._clock() - entry[1] > self._explore_after_s:
            return None
        return entry[0]


def retry_backoff_s(attempt: int, *, base_s: float = 0.05, cap_s: float = 1.0) -> float:
    """The pause before try number ``attempt`` (1 for the first retry): doubling from ``base_s``."""
    return min(cap_s, base_s * 2.0 ** max(0, attempt - 1))
