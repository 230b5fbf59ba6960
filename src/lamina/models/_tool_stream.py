"""Finding tool calls in a model's text as it streams, in the Hermes/Qwen convention:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

:class:`ToolStream` is fed each piece of text and answers with events: content to show, the start of a call
(its id and name, as soon as ``{"name": ..., "arguments":`` has been read) and fragments of its arguments,
sent as they arrive. Text that may be the start of ``<tool_call>`` is held back until it is known, and so is
the tail of the arguments that may turn out to be the call's closing brace. A block that is not a call of a
known function is shown as the text it was. Fed a whole answer at once, the same machine parses a
non-streamed one (:func:`parse_calls`), so both ways give the same calls.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"([a-zA-Z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*(?=[^\s"])')
#: the end of a call's arguments that may still be the closing brace of the call itself
_TAIL = re.compile(r"\s*\}?\s*$")


def new_call_id() -> str:
    """An id in OpenAI's form: ``call_`` and 24 random characters."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolEvent:
    """``content`` (text to show), ``call`` (a call starts: ``index``, ``call_id``, ``name``) or
    ``arguments`` (the next fragment of call ``index``'s arguments)."""

    kind: Literal["content", "call", "arguments"]
    text: str = ""
    index: int = 0
    call_id: str = ""
    name: str = ""


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    #: the arguments as a JSON text, as OpenAI sends them
    arguments: str

    def json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _partial_close(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker`` (and is shorter than it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _settled(arguments: str) -> str:
    """The part of the arguments read so far that stays whatever comes next: without a possible start of
    ``</tool_call>`` and without a closing brace (and white space) that may be the call's own."""
    arguments = arguments[: len(arguments) - _partial_close(arguments, CLOSE)]
    match = _TAIL.search(arguments)
    return arguments[: match.start()] if match else arguments


def _whole_call(block: str, names: frozenset[str]) -> tuple[str, str] | None:
    """``(name, arguments)`` of a block that is one JSON call of a known function, else None."""
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in names:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return str(call["name"]), text


@dataclass
class ToolStream:
    """The state of one answer being read; ``feed`` each piece, then ``finish``."""

    names: frozenset[str]
    #: False: the first call ends the answer (``parallel_tool_calls: false``, the legacy functions API)
    parallel: bool = True
    new_id: Callable[[], str] = new_call_id
    #: how many calls have started
    calls: int = 0
    #: True once nothing more will be read (a single call was asked for and has been made)
    done: bool = False
    _state: Literal["text", "call", "arguments"] = "text"
    _pending: str = ""
    _blank: str = ""
    _sent: int = 0
    _out: list[ToolEvent] = field(default_factory=list)

    def feed(self, text: str) -> list[ToolEvent]:
        if not self.done:
            self._pending += text
            self._advance(final=False)
        return self._take()

    def finish(self) -> list[ToolEvent]:
        """The events the rest of the text makes once the answer has ended."""
        if not self.done:
            self._advance(final=True)
            if self._state == "call":
                self._close_block(self._pending, closed=False)
            elif self._state == "arguments":
                self._close_arguments(self._pending)
            self._pending = ""
        if self._blank and not self.calls:
            self._out.append(ToolEvent("content", self._blank))
        self._blank = ""
        return self._take()

    def _take(self) -> list[ToolEvent]:
        out, self._out = self._out, []
        return out

    def _advance(self, final: bool) -> None:
        while not self.done:
            if self._state == "text":
                start = self._pending.find(OPEN)
                if start < 0:
                    keep = 0 if final else _partial_close(self._pending, OPEN)
                    self._say(self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep :]
                    return
                self._say(self._pending[:start])
                self._pending, self._state = self._pending[start + len(OPEN) :], "call"
            end = self._pending.find(CLOSE)
            if self._state == "call":
                header = _HEADER.match(self._pending)
                if header and header.group(1) in self.names and (end < 0 or header.end() <= end):
                    self._start(header.group(1))
                    self._pending, self._state, self._sent = self._pending[header.end() :], "arguments", 0
                    continue
                if end < 0:
                    return
                self._close_block(self._pending[:end], closed=True)
            elif end < 0:
                self._send(_settled(self._pending))
                return
            else:
                self._close_arguments(self._pending[:end])
            self._pending, self._state = self._pending[end + len(CLOSE) :], "text"

    def _say(self, text: str) -> None:
        """Content, with white space held back until text follows it (none shows between calls)."""
        if not text:
            return
        if text.isspace():
            self._blank += text
            return
        self._out.append(ToolEvent("content", self._blank + text))
        self._blank = ""

    def _start(self, name: str) -> None:
        self._out.append(ToolEvent("call", index=self.calls, call_id=self.new_id(), name=name))
        self.calls += 1
        self._blank = ""

    def _send(self, arguments: str) -> None:
        if len(arguments) > self._sent:
            self._out.append(ToolEvent("arguments", arguments[self._sent :], index=self.calls - 1))
            self._sent = len(arguments)

    def _close_arguments(self, arguments: str) -> None:
        self._send(_settled(arguments))
        self.done = not self.parallel

    def _close_block(self, block: str, closed: bool) -> None:
        """A block whose header was not read as it came: a whole call after all, or text to show."""
        call = _whole_call(block, self.names)
        if call is None:
            self._say(OPEN + block + (CLOSE if closed else ""))
            return
        self._start(call[0])
        self._sent = 0
        self._send(call[1])
        self.done = not self.parallel


@dataclass(frozen=True)
class ParsedCalls:
    """A whole answer split into its content (None when there is none besides calls) and its calls."""

    content: str | None
    calls: tuple[ToolCall, ...]


def collect_events(events: Iterable[ToolEvent]) -> ParsedCalls:
    """The content and calls that a sequence of events makes."""
    content: list[str] = []
    calls: list[list[str]] = []
    for e in events:
        if e.kind == "content":
            content.append(e.text)
        elif e.kind == "call":
            calls.append([e.call_id, e.name, ""])
        else:
            calls[e.index][2] += e.text
    text = "".join(content)
    if calls:
        text = text.strip()
    return ParsedCalls((text or None) if calls else text, tuple(ToolCall(*c) for c in calls))


def parse_calls(
    text: str, names: frozenset[str], parallel: bool = True, new_id: Callable[[], str] = new_call_id
) -> ParsedCalls:
    """The content and calls of a whole answer, exactly as streaming it would have given them."""
    stream = ToolStream(names, parallel, new_id)
    return collect_events([*stream.feed(text), *stream.finish()])
