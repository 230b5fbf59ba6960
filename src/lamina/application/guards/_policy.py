"""The guards at work in the gateway: :class:`GuardPolicy` on a call's input, :class:`OutputGuards` on
the model's answer.

Input: the texts a model will read from the client (the user messages' text, a completion's prompt, the
embedding inputs) go through the input guards in their configured order, each guard seeing the text as the
guards before it left it. A block refuses the call (400 ``content_blocked``, naming the guard and what it
found, never the text itself); a redaction rewrites ``call.body`` before it is dispatched; a flag is only
recorded. A guard that fails closed refuses the call with a 503 (the input could not be checked).

Output: a plain answer's message texts are checked the same way once the replica has answered (the
answer's cost is settled first: the model did the work); streams are checked as they flow by
:class:`~lamina.application.guards._stream.StreamGuard`.

Every guard's decision on a call is recorded on the request's span (an event ``lamina.guard`` with the
guard, verdict, direction, finding types and time taken) and counted once per guard and call in
``lamina_guard_decisions_total{guard,action,direction}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from opentelemetry import trace

from lamina.application._policy import Call, Principal, Ticket
from lamina.application.guards._base import Decision, Direction, Guard, run_chain, worst
from lamina.application.guards._output import JsonSchemaGuard
from lamina.errors import ContentBlockedError, UnavailableError
from lamina.observability import GatewayMetrics

log = logging.getLogger("lamina.guards")

#: where a text sits in a JSON body: its container and key, so a redaction can be written back
Slot = tuple[dict[str, Any] | list[Any], Any]


def applies(guard: Guard, principal: Principal) -> bool:
    exempt = guard.settings.exempt
    return not exempt or (principal.name not in exempt and principal.key_id not in exempt)


def input_slots(body: dict[str, Any]) -> list[Slot]:
    """The client texts of a request body: user messages (string content or text parts), ``prompt`` and
    ``input`` (a string or a list of strings; token-id inputs are not text and are not checked)."""
    slots: list[Slot] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict) or message.get("role") != "user":
                continue
            content = message.get("content")
            if isinstance(content, str):
                slots.append((message, "content"))
            elif isinstance(content, list):
                slots += [
                    (part, "text")
                    for part in content
                    if isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ]
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            slots.append((body, key))
        elif isinstance(value, list):
            slots += [(value, i) for i, item in enumerate(value) if isinstance(item, str)]
    return slots


def answer_slots(body: dict[str, Any]) -> list[Slot]:
    """The texts of a plain answer: each choice's message content (chat) or text (completion)."""
    slots: list[Slot] = []
    choices = body.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            slots.append((message, "content"))
        elif isinstance(choice.get("text"), str):
            slots.append((choice, "text"))
    return slots


class GuardRecorder:
    """Records guard decisions on a span and in the metrics."""

    def __init__(self, metrics: GatewayMetrics | None) -> None:
        self._metrics = metrics

    def record(self, span: trace.Span, direction: Direction, decisions: Sequence[Decision]) -> None:
        """One guard's decisions on the texts of one call (or one check of a stream)."""
        top = worst(decisions)
        if top is None:
            return
        entities = list(dict.fromkeys(e for d in decisions for e in d.entities))
        span.add_event(
            "lamina.guard",
            {
                "lamina.guard.name": top.guard,
                "lamina.guard.verdict": top.verdict,
                "lamina.guard.direction": direction,
                "lamina.guard.entities": entities,
                "lamina.guard.failed": top.failed,
                "lamina.guard.ms": round(sum(d.seconds for d in decisions) * 1000, 3),
            },
        )
        if top.verdict != "allow" or top.failed:
            span.set_attribute(f"lamina.guard.{direction}.{top.guard}", top.verdict)
        if self._metrics is not None:
            self._metrics.observe_guard(guard=top.guard, action=metric_action(top), direction=direction)


def metric_action(decision: Decision) -> str:
    if decision.failed:
        return "fail_open" if decision.verdict == "allow" else "fail_closed"
    return decision.verdict


def refusal(decision: Decision, direction: Direction) -> ContentBlockedError | UnavailableError:
    """The error for a blocking decision: names the guard and the finding types, never the text."""
    what = "the request's input" if direction == "input" else "the model's answer"
    found = ", ".join(decision.entities)
    if decision.failed:
        return UnavailableError(
            f"the guard {decision.guard!r} could not check {what} ({found}) and is configured to fail "
            "closed; send the request again, and if it keeps failing ask the operator to look at the guard",
            guard=decision.guard,
            findings=decision.entities,
        )
    remedy = (
        "remove it from the request and send it again"
        if direction == "input"
        else "change the request (the answer is withheld), or ask the operator about the guard"
    )
    return ContentBlockedError(
        f"{what} was blocked by the guard {decision.guard!r}: it found {found}; {remedy}",
        param="messages" if direction == "input" else None,
        guard=decision.guard,
        findings=decision.entities,
    )


async def apply_guards(
    guards: Sequence[Guard],
    slots: Sequence[Slot],
    *,
    principal: Principal,
    span: trace.Span,
    direction: Direction,
    recorder: GuardRecorder,
    limiter: anyio.CapacityLimiter,
) -> None:
    """Run ``guards`` in order over the texts at ``slots`` (one worker thread for them all): raise on a
    block, write redactions back."""
    texts = [container[key] for container, key in slots]
    applicable = [g for g in guards if applies(g, principal)]
    if not texts or not applicable:
        return
    for decisions in await run_chain(applicable, texts, limiter):
        recorder.record(span, direction, decisions)
        top = worst(decisions)
        if top is not None and top.verdict == "block":
            raise refusal(top, direction)
        for i, decision in enumerate(decisions):
            if decision.verdict == "redact" and decision.text is not None:
                container, key = slots[i]
                container[key] = decision.text


class GuardPolicy:
    """The input guards as a :class:`~lamina.application.Policy` (admission only: nothing to settle)."""

    #: its span in the request's trace
    step = "guards"

    def __init__(
        self, guards: Sequence[Guard], recorder: GuardRecorder, limiter: anyio.CapacityLimiter | None = None
    ) -> None:
        self._guards = list(guards)
        self._recorder = recorder
        self._limiter = limiter or anyio.CapacityLimiter(8)

    @property
    def guards(self) -> list[Guard]:
        return list(self._guards)

    async def admit(self, call: Call) -> Ticket | None:
        await apply_guards(
            self._guards,
            input_slots(call.body),
            principal=call.principal,
            span=call.span,
            direction="input",
            recorder=self._recorder,
            limiter=self._limiter,
        )
        return None


@dataclass(frozen=True)
class RequestSchema:
    """A json_schema output guard without a schema of its own: it checks the request's response_format."""

    name: str
    make: Callable[[dict[str, Any]], JsonSchemaGuard]


class OutputGuards:
    """The output guards: on a plain answer (``check_answer``) or a stream (``stream``)."""

    def __init__(
        self,
        guards: Sequence[Guard],
        recorder: GuardRecorder,
        *,
        request_schemas: Sequence[RequestSchema] = (),
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        self._guards = list(guards)
        self._request_schemas = list(request_schemas)
        self.recorder = recorder
        self.limiter = limiter or anyio.CapacityLimiter(8)

    def for_call(self, call: Call) -> list[Guard]:
        """The guards that apply to ``call``'s answer (a request-schema guard when it asks for one)."""
        guards = [g for g in self._guards if applies(g, call.principal)]
        schema = JsonSchemaGuard.request_schema(call.body)
        for request_schema in self._request_schemas if schema is not None else ():
            try:
                guards.append(request_schema.make(dict(schema or {})))
            except ValueError as exc:  # the client's own schema is broken: nothing to check against
                log.warning("guard %s skipped: %s", request_schema.name, exc)
        return [g for g in guards if applies(g, call.principal)]

    async def check_answer(self, call: Call, body: dict[str, Any]) -> None:
        """Check a plain answer in place: raise ContentBlockedError, or rewrite its redacted texts."""
        guards = self.for_call(call)
        if guards and call.operation != "embeddings":
            await apply_guards(
                guards,
                answer_slots(body),
                principal=call.principal,
                span=call.span,
                direction="output",
                recorder=self.recorder,
                limiter=self.limiter,
            )
