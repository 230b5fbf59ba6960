"""From a validated OpenAI request to what an engine runs, and whether the engine can.

:func:`plan_chat` turns a chat request into the messages to render, the :class:`SamplingParams` (with the
grammar that ``response_format`` and a forced ``tool_choice`` take) and the tool plan that reads the answer;
:func:`plan_completion` does the same for a text completion. Both first check the request against the
engine's capabilities (:func:`check_capabilities`): a request that needs what the engine lacks is a 400
naming the field that asks for it, before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass

from lamina.errors import UnsupportedCapabilityError
from lamina.models._engine import Capability, ChatMessage, SamplingParams
from lamina.models._openai import ChatCompletionRequest, CompletionRequest
from lamina.models._structured import ANY_OBJECT, GrammarBuilder
from lamina.models._tools import ToolPlan, render_messages, tool_plan


@dataclass(frozen=True)
class ChatPlan:
    """What the engine runs for one chat request, and how its answer is read."""

    messages: list[ChatMessage]
    params: SamplingParams
    #: the tools offered, None when there are none (or ``tool_choice`` is ``none``): the answer is text
    tools: ToolPlan | None


def _wants_json(req: ChatCompletionRequest) -> bool:
    return req.response_format is not None and req.response_format.type != "text"


def _logprobs(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    return req.top_logprobs_k if isinstance(req, ChatCompletionRequest) else req.logprobs


def needed_capabilities(
    req: ChatCompletionRequest | CompletionRequest, tools: ToolPlan | None = None
) -> dict[Capability, str]:
    """Each capability beyond plain sampling that ``req`` needs, with the field that asks for it."""
    needed: dict[Capability, str] = {}
    for name in ("presence_penalty", "frequency_penalty", "logit_bias"):
        if getattr(req, name):
            needed.setdefault(Capability.PENALTIES, name)
    if _logprobs(req) is not None:
        needed[Capability.LOGPROBS] = "logprobs"
    if isinstance(req, ChatCompletionRequest):
        if tools is not None and tools.mode != "auto":
            needed[Capability.GRAMMAR] = "function_call" if tools.legacy else "tool_choice"
        elif _wants_json(req):
            needed[Capability.GRAMMAR] = "response_format"
    return needed


def check_capabilities(
    req: ChatCompletionRequest | CompletionRequest,
    capabilities: frozenset[Capability],
    model: str,
    tools: ToolPlan | None = None,
) -> None:
    """An UnsupportedCapabilityError (400, ``param`` the field) when ``req`` needs what the engine lacks: log
    probabilities, a grammar (JSON output, forced tool calls), penalties; or reads a part that is not text."""
    for capability, field in needed_capabilities(req, tools).items():
        if capability not in capabilities:
            can = ", ".join(sorted(c.value for c in capabilities))
            raise UnsupportedCapabilityError(
                f"model {model!r} cannot do {capability.value}, which `{field}` asks for; it can do: {can}. "
                f"Leave `{field}` out, or send the request to a model that can",
                param=field,
            )
    if isinstance(req, ChatCompletionRequest):
        for i, m in enumerate(req.messages):
            for j, kind in m.non_text_parts():
                raise UnsupportedCapabilityError(
                    f"messages.{i}.content.{j} is an {kind} part, and model {model!r} reads text only; send "
                    "text parts only, or send the request to a model that reads this kind of part",
                    param=f"messages.{i}.content.{j}",
                )


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest, grammar: str | None = None
) -> SamplingParams:
    """Every sampling field of ``req`` as the engine takes it."""
    return SamplingParams(
        max_tokens=req.token_limit,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_list,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=req.logit_bias_pairs,
        logprobs=_logprobs(req),
        grammar=grammar,
    )


def chat_grammar(req: ChatCompletionRequest, tools: ToolPlan | None) -> str | None:
    """The grammar the answer must match: a forced tool call; else the ``response_format`` (or, with tools
    offered in ``auto``, that or a call); None when the answer is free. A 400 names what it cannot enforce."""
    if tools is not None:
        tools.check_strict()
    forced = tools is not None and tools.mode != "auto"
    if not forced and not _wants_json(req):
        return None
    builder = GrammarBuilder()
    alternatives = [] if tools is None else [tools.calls(builder)]
    fmt = req.response_format
    if not forced and fmt is not None:
        spec = fmt.json_schema if fmt.type == "json_schema" else None
        schema = ANY_OBJECT if spec is None or spec.schema_ is None else spec.schema_
        where = "response_format.json_schema.schema" if spec is not None else "response_format"
        alternatives.append(
            builder.schema(schema, "answer", where, strict=spec is not None and bool(spec.strict))
        )
    return builder.grammar(" | ".join(alternatives))


def plan_chat(req: ChatCompletionRequest, capabilities: frozenset[Capability], model: str) -> ChatPlan:
    """Check ``req`` against the engine's capabilities, then plan it (see the module's docstring)."""
    tools = tool_plan(req)
    check_capabilities(req, capabilities, model, tools)
    params = sampling_params(req, chat_grammar(req, tools))
    return ChatPlan(render_messages(req.messages, tools), params, tools)


def plan_completion(
    req: CompletionRequest, capabilities: frozenset[Capability], model: str
) -> SamplingParams:
    """Check ``req`` against the engine's capabilities; its sampling parameters."""
    check_capabilities(req, capabilities, model)
    return sampling_params(req)
