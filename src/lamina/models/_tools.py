"""Tool calling for models whose chat template knows no tools (SmolLM2's ChatML), in the Hermes/Qwen form.

A :class:`ToolPlan` is what a request asks of tool calling (``tools`` and ``tool_choice``, or the legacy
``functions`` and ``function_call``, answered in their own shape). It gives:

- the system prompt that describes the tools and the calling convention (Qwen2.5's wording: the model
  answers ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``), which :func:`render_messages`
  appends to the system message (or adds one);
- for ``required`` and a named function, the GBNF grammar that forces one such call, its arguments held to
  the function's parameters schema; ``auto`` samples freely and the calls are read from the text after;
- the reader of the answer (``_tool_stream``), streamed or whole.

:func:`render_messages` also spells earlier turns in the same convention, always: an assistant's
``tool_calls`` as ``<tool_call>`` blocks, and a run of ``tool`` (or legacy ``function``) results as one user
turn of ``<tool_response>`` blocks, as Qwen2.5's template does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from lamina.models._engine import ChatMessage
from lamina.models._openai import ChatCompletionRequest
from lamina.models._openai_chat import ChatMessageIn, FunctionDef, NamedToolChoice
from lamina.models._structured import GrammarBuilder
from lamina.models._tool_stream import CLOSE, OPEN, ParsedCalls, ToolStream, new_call_id, parse_calls

#: the parameters of a function that declares none
NO_PARAMETERS: Mapping[str, Any] = MappingProxyType(
    {"type": "object", "properties": {}, "required": [], "additionalProperties": False}
)

_PROMPT = """# Tools

{preamble}

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolPlan:
    """The functions a request offers and how the model is to use them."""

    functions: tuple[FunctionDef, ...]
    #: ``auto``: the model may call; ``required``: it must call one; ``named``: it must call ``forced``
    mode: Literal["auto", "required", "named"] = "auto"
    forced: str | None = None
    #: several calls in one answer (``parallel_tool_calls``); a forced call is always one
    parallel: bool = True
    #: the legacy ``functions`` API: one call, answered as ``message.function_call``
    legacy: bool = False

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.functions)

    def where(self, index: int) -> str:
        """The request path of function ``index``'s parameters."""
        return f"functions.{index}.parameters" if self.legacy else f"tools.{index}.function.parameters"

    def system_prompt(self) -> str:
        tools = "\n".join(json.dumps(_signature(f), ensure_ascii=False) for f in self.functions)
        if self.mode == "named":
            preamble = f"You must call the function {self.forced} to answer the user query."
        elif self.mode == "required":
            preamble = "You must call one of these functions to answer the user query."
        elif self.parallel and not self.legacy:
            preamble = "You may call one or more functions to assist with the user query."
        else:
            preamble = "You may call one function to assist with the user query."
        return _PROMPT.format(preamble=preamble, tools=tools)

    def calls(self, builder: GrammarBuilder) -> str:
        """Add to ``builder`` the rules of one ``<tool_call>`` block calling a function this plan lets the
        model call (the named one, else any), its arguments held to that function's parameters; returns the
        block's expression. A 400 names a schema keyword that cannot be enforced."""
        calls = []
        for i, f in enumerate(self.functions):
            if self.forced is not None and f.name != self.forced:
                continue
            schema = NO_PARAMETERS if f.parameters is None else f.parameters
            arguments = builder.schema(schema, f"{f.name}-arguments", self.where(i), strict=bool(f.strict))
            name, args = (builder.literal(json.dumps(k)) for k in ("name", "arguments"))
            fields = (
                f'{name} space ":" space {builder.literal(json.dumps(f.name))} space "," space '
                f'{args} space ":" space {arguments}'
            )
            calls.append(builder.rule(f"{f.name}-call", f'"{{" space {fields} "}}" space'))
        return f"{builder.literal(OPEN + chr(10))} ({' | '.join(calls)}) {builder.literal(chr(10) + CLOSE)}"

    def check_strict(self) -> None:
        """A 400 for a strict function whose schema breaks OpenAI's strict rules, whatever the mode (as
        OpenAI checks them), or holds a keyword that cannot be enforced."""
        builder = GrammarBuilder()
        for i, f in enumerate(self.functions):
            if f.strict:
                builder.schema(
                    NO_PARAMETERS if f.parameters is None else f.parameters,
                    f.name,
                    self.where(i),
                    strict=True,
                )

    def stream(self, new_id: Callable[[], str] = new_call_id) -> ToolStream:
        """A reader of one streamed answer."""
        return ToolStream(self.names, self.parallel and not self.legacy, new_id)

    def parse(self, text: str, new_id: Callable[[], str] = new_call_id) -> ParsedCalls:
        """The content and calls of a whole answer."""
        return parse_calls(text, self.names, self.parallel and not self.legacy, new_id)


def _signature(f: FunctionDef) -> dict[str, Any]:
    function: dict[str, Any] = {"name": f.name}
    if f.description:
        function["description"] = f.description
    function["parameters"] = dict(NO_PARAMETERS) if f.parameters is None else f.parameters
    return {"type": "function", "function": function}


def tool_plan(req: ChatCompletionRequest) -> ToolPlan | None:
    """What ``req`` asks of tool calling; None when it offers no tools or chooses none."""
    if req.functions:
        choice: Any = req.function_call
        functions = tuple(req.functions)
        forced = choice.name if choice is not None and not isinstance(choice, str) else None
    else:
        choice = req.tool_choice
        functions = tuple(t.function for t in req.tools or ())
        forced = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if not functions or choice == "none":
        return None
    mode: Literal["auto", "required", "named"] = (
        "named" if forced is not None else "required" if choice == "required" else "auto"
    )
    return ToolPlan(
        functions=functions,
        mode=mode,
        forced=forced,
        parallel=req.parallel_tool_calls is not False and mode == "auto",
        legacy=bool(req.functions),
    )


def call_text(name: str, arguments: str) -> str:
    """One call in the model's convention; arguments that are JSON are written as JSON."""
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments
    call = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{OPEN}\n{call}\n{CLOSE}"


def _assistant_text(m: ChatMessageIn) -> str:
    calls = [call_text(c.function.name, c.function.arguments) for c in m.tool_calls or ()]
    if m.function_call is not None:
        calls.append(call_text(m.function_call.name, m.function_call.arguments))
    return "\n".join([t for t in (m.text(),) if t] + calls)


def render_messages(messages: Sequence[ChatMessageIn], plan: ToolPlan | None) -> list[ChatMessage]:
    """The messages as the chat template takes them: tool turns spelled out, ``developer`` as ``system``,
    and the tools described in the system message when ``plan`` offers any."""
    out: list[ChatMessage] = []
    results: list[str] = []
    for m in messages:
        if m.role in ("tool", "function"):
            results.append(f"<tool_response>\n{m.text()}\n</tool_response>")
            continue
        if results:
            out.append(ChatMessage("user", "\n".join(results)))
            results = []
        if m.role == "assistant":
            out.append(ChatMessage("assistant", _assistant_text(m)))
        else:
            out.append(ChatMessage("system" if m.role == "developer" else m.role, m.text()))
    if results:
        out.append(ChatMessage("user", "\n".join(results)))
    if plan is not None:
        prompt = plan.system_prompt()
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{prompt}" if out[0].content else prompt)
        else:
            out.insert(0, ChatMessage("system", prompt))
    return out
