"""Output guards on a stream, checked as the text flows.

The relay hands each parsed content chunk to :meth:`StreamGuard.chunk` and calls :meth:`StreamGuard.end`
before the stream's last events (the chunk with a ``finish_reason``, the usage chunk, ``[DONE]``). The
answer's text is kept per choice; every ``CHECK_EVERY`` new characters (before the chunk that brings
them is sent) the guards look at the last ``WINDOW`` characters (a length guard at the whole text), and
at the end at everything not yet checked (a JSON-schema guard at the whole answer). A block raises
ContentBlockedError: the relay ends the stream with an error event and ``[DONE]``, so a client never
takes a cut answer for a whole one. Without a redacting guard nothing is held back, so up to
``CHECK_EVERY`` characters of what a guard blocks may have reached the client before the block: blocking
on a stream limits the damage, it cannot undo it.

Redaction needs the text before it is sent, so when an output guard redacts, the stream is held back:
the last ``HOLD`` characters of each choice wait until more text (or the end) shows whether they belong
to a finding, and the text is sent on in new chunks (the replica's chunk with its ``content``/``text``
replaced; other per-token fields such as logprobs are not carried for held text). A finding longer than
``HOLD`` characters that began in text already sent cannot be redacted; ``HOLD`` is longer than every
pattern entity but a private key block (which is found by its first line and ends the stream blocked
when it cannot be redacted in full). Held text costs the client ``HOLD`` characters of latency.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from opentelemetry import trace

from lamina.application._policy import Call
from lamina.application.guards._base import Decision, Finding, Guard, redact, run_chain, worst
from lamina.application.guards._output import JsonSchemaGuard, LengthGuard
from lamina.application.guards._policy import GuardRecorder, OutputGuards, refusal

CHECK_EVERY = 64
WINDOW = 2048
HOLD = 160


@dataclass
class _Choice:
    text: str = ""
    #: characters of ``text`` already checked / already released to the client
    checked: int = 0
    released: int = 0
    #: the last chunk seen for this choice: the model for the chunks that carry held text
    template: dict[str, Any] = field(default_factory=dict)


def _delta(choice: dict[str, Any]) -> tuple[str, bool] | None:
    """A choice's new text and whether it is chat (``delta.content``) rather than completion (``text``)."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return (content, True) if isinstance(content, str) else None
    text = choice.get("text")
    return (text, False) if isinstance(text, str) else None


class StreamGuard:
    """The output guards of one stream (see the module doc)."""

    def __init__(
        self,
        guards: Sequence[Guard],
        recorder: GuardRecorder,
        span: trace.Span,
        limiter: anyio.CapacityLimiter,
    ) -> None:
        self._window = [g for g in guards if not isinstance(g, LengthGuard | JsonSchemaGuard)]
        self._whole = [g for g in guards if isinstance(g, LengthGuard)]
        self._end = [g for g in guards if isinstance(g, JsonSchemaGuard)]
        self.holds = any(g.settings.action == "redact" for g in guards)
        self._recorder = recorder
        self._span = span
        self._limiter = limiter
        self._choices: dict[int, _Choice] = {}
        self._seen: dict[str, Decision] = {}

    async def chunk(self, chunk: dict[str, Any]) -> bytes | None:
        """Take one content chunk: None to send it as it came, else the bytes to send in its place
        (empty while its text is held back). Raises ContentBlockedError on a block."""
        choices = chunk.get("choices")
        carried = False
        for raw in choices if isinstance(choices, list) else ():
            got = _delta(raw) if isinstance(raw, dict) else None
            if not got or not got[0]:
                continue  # a role, a tool call, a finish: nothing to check or hold
            carried = True
            state = self._choices.setdefault(int(raw.get("index", 0)), _Choice())
            state.text += got[0]
            state.template = chunk
            if len(state.text) - state.checked >= CHECK_EVERY:
                await self._check(state, final=False)
        if not self.holds or not carried:
            return None
        return self._release(final=False)

    async def end(self) -> bytes:
        """The stream is ending: check what is left (and the whole answer); the held text to send."""
        for state in self._choices.values():
            await self._check(state, final=True)
        self._summarize()
        return self._release(final=True) if self.holds else b""

    async def _check(self, state: _Choice, *, final: bool) -> None:
        # the last WINDOW characters, and at least all the held text (findings there can be redacted)
        start = max(0, len(state.text) - WINDOW)
        if self.holds:
            start = min(start, state.released)
        decisions = await self._run(self._window, state.text[start:])
        whole = await self._run([*self._whole, *(self._end if final else [])], state.text)
        for d in (*decisions, *whole):
            self._note(d)
        top = worst([*decisions, *whole])
        if top is not None and top.verdict == "block":
            self._summarize()
            raise refusal(top, "output")
        state.checked = len(state.text)
        for d in decisions:
            if d.verdict == "redact":
                self._redact(state, d, start)

    def _redact(self, state: _Choice, decision: Decision, offset: int) -> None:
        """Redact the findings of ``decision`` (made on ``state.text[offset:]``) in the held text; one that
        reaches into text already sent cannot be, and blocks instead."""
        findings = [Finding(f.entity, f.score, f.start + offset, f.end + offset) for f in decision.findings]
        late = tuple(f for f in findings if f.start < state.released)
        if late:
            self._summarize()
            raise refusal(Decision(decision.guard, "block", late), "output")
        held = state.text[state.released :]
        shifted = [
            Finding(f.entity, f.score, f.start - state.released, f.end - state.released) for f in findings
        ]
        state.text = state.text[: state.released] + redact(held, shifted)
        state.checked = len(state.text)

    async def _run(self, guards: Sequence[Guard], text: str) -> list[Decision]:
        results = await run_chain(guards, [text], self._limiter, chained=False)
        return [d for decisions in results for d in decisions]

    def _note(self, decision: Decision) -> None:
        """Keep each guard's most severe decision, recorded once for the stream by ``_summarize``."""
        before = self._seen.get(decision.guard)
        top = worst([d for d in (before, decision) if d is not None])
        assert top is not None
        self._seen[decision.guard] = top

    def _summarize(self) -> None:
        """One record per guard for the whole stream (called once, at the end or on a block)."""
        seen, self._seen = self._seen, {}
        for decision in seen.values():
            self._recorder.record(self._span, "output", [decision])

    def _release(self, *, final: bool) -> bytes:
        out = b""
        for index, state in sorted(self._choices.items()):
            upto = len(state.text) if final else max(state.released, state.checked - HOLD)
            if upto <= state.released:
                continue
            piece = state.text[state.released : upto]
            state.released = upto
            out += _event(state.template, index, piece)
        return out


def _event(template: dict[str, Any], index: int, text: str) -> bytes:
    """A chunk like ``template`` carrying ``text`` for choice ``index`` only."""
    chunk = copy.copy(template)
    chat = any(isinstance(c, dict) and "delta" in c for c in template.get("choices", []))
    choice: dict[str, Any] = {"index": index, "finish_reason": None}
    if chat:
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    chunk["choices"] = [choice]
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def stream_guard(output: OutputGuards, call: Call) -> StreamGuard | None:
    """The guard of ``call``'s stream, None when no output guard applies to it."""
    guards = output.for_call(call)
    if not guards:
        return None
    return StreamGuard(guards, output.recorder, call.span, output.limiter)
