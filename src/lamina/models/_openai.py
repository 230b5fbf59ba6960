"""OpenAI-compatible wire types, spoken by the gateway to clients and by replica workers to the gateway.

Requests are validated strictly enough to name the bad field, and loosely enough that every field the
official client sends is accepted: unknown fields are kept and ignored, as OpenAI does with new ones, and a
null stands for the field's default. Fields OpenAI defines that no engine here can honour (``audio``,
``prediction``, ``web_search_options``, ...) are a 400 naming the field, never silently dropped. Checks that
span fields are field validators reading the fields declared before them (``info.data``), so that each error
is located at the field a client has to change.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from lamina.models._openai_chat import (
    ChatMessageIn,
    FunctionDef,
    FunctionName,
    NamedToolChoice,
    ResponseFormat,
    StreamOptions,
    ToolDef,
    Wire,
    problem,
)

_TOKEN_ID = re.compile(r"\d{1,9}")


def _refuse(field: str, message: str) -> PydanticCustomError:
    return problem("unsupported_field", f"{message}; leave `{field}` out")


class _SamplingRequest(Wire):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    #: token id (a decimal string) -> bias in -100..100 added to its logit
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, description="Only n=1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise problem(
                "one_choice",
                "one choice per request is supported; for several answers send the request that many "
                "times (with a different `seed` each, or a temperature above 0), and leave `n` out",
            )
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise problem(
                    "logit_bias_key",
                    f'logit_bias maps token ids, written as strings, to biases (e.g. {{"50256": -100}}); '
                    f"the key {key!r} is not a token id",
                )
            if not -100 <= bias <= 100:
                raise problem(
                    "logit_bias_value", f"the bias for token {key} is {bias}; biases lie in -100..100"
                )
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items()))


#: fields of OpenAI's chat API that no engine here honours, and why; a value other than null is a 400
_UNSUPPORTED_CHAT = {
    "audio": "audio output is not supported: these models write text",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported (retrieval from ingested datasets is the `rag` field)",
    "reasoning_effort": "reasoning effort is not supported: these models do not reason before answering",
    "verbosity": "verbosity is not supported",
    "moderation": "moderation settings are not supported (the gateway's guardrails are configured on it)",
}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    #: the legacy form of ``tools``, answered in its own shape (``message.function_call``)
    functions: list[FunctionDef] | None = Field(None, min_length=1)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    #: the legacy form of ``tool_choice``
    function_call: Literal["none", "auto"] | FunctionName | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise problem("top_logprobs", "`top_logprobs` needs `logprobs: true`")
        return v

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, v: list[ToolDef] | None) -> list[ToolDef] | None:
        names = [t.function.name for t in v or ()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise problem("tools_unique", f"each tool needs its own name; {', '.join(twice)} appear twice")
        return v

    @field_validator("functions")
    @classmethod
    def _not_both(cls, v: list[FunctionDef] | None, info: ValidationInfo) -> list[FunctionDef] | None:
        if v is not None and info.data.get("tools"):
            raise problem("functions", "send `tools` or the legacy `functions`, not both")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _known_tool(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or v == "none" or "tools" not in info.data:
            return v
        names = [t.function.name for t in info.data["tools"] or ()]
        if not names:
            raise problem("tool_choice", f"tool_choice {_shown(v)} needs `tools` to choose from")
        if isinstance(v, NamedToolChoice) and v.function.name not in names:
            raise problem(
                "tool_choice",
                f"tool_choice names {v.function.name!r}, which is not in `tools` ({', '.join(names)})",
            )
        return v

    @field_validator("function_call")
    @classmethod
    def _known_function(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or v == "none" or "functions" not in info.data:
            return v
        names = [f.name for f in info.data["functions"] or ()]
        if not names:
            raise problem("function_call", "function_call needs `functions` to choose from")
        if isinstance(v, FunctionName) and v.name not in names:
            raise problem(
                "function_call",
                f"function_call names {v.name!r}, which is not in `functions` ({', '.join(names)})",
            )
        return v

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and v != ["text"]:
            raise problem(
                "unsupported_field",
                f'only text output is supported, not {v}; send ["text"] or leave `modalities` out',
            )
        return v

    @field_validator(*_UNSUPPORTED_CHAT)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        if v is not None:
            raise _refuse(info.field_name, _UNSUPPORTED_CHAT[info.field_name])
        return v

    @property
    def top_logprobs_k(self) -> int | None:
        """None when log probabilities are off, else how many alternatives each token comes with."""
        return (self.top_logprobs or 0) if self.logprobs else None


def _text_only(value: Any, what: str, send: str) -> Any:
    """``value``, unless it is OpenAI's token-id form of a prompt or input (ints, or lists of ints): token
    ids are the model's tokenizer's, which a client cannot know here."""
    first = value[0] if isinstance(value, list) and value else None
    if isinstance(first, list):
        first = first[0] if first else None
    if isinstance(first, int) and not isinstance(first, bool):
        raise problem(
            "token_ids", f"{what} is not supported: token ids depend on the model's tokenizer; send {send}"
        )
    return value


def _shown(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else f"for {choice.function.name!r}"


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    echo: bool = False
    #: the legacy API's log probabilities: each token's and its ``logprobs`` most likely alternatives
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, v: Any) -> Any:
        return _text_only(v, "a prompt of token ids", "the prompt as text")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise problem(
                "one_prompt", "exactly one prompt is supported per request; send one request per prompt"
            )
        return v

    @field_validator("logprobs")
    @classmethod
    def _not_echoed(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("echo"):
            raise _refuse("logprobs", "log probabilities of an echoed prompt are not returned")
        return v

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise _refuse("best_of", "best_of above 1 is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise _refuse("suffix", "inserting text before a suffix is not supported")
        return v

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(Wire):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(description="A text or a list of texts.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _text_input(cls, v: Any) -> Any:
        return _text_only(
            v,
            "input as token ids",
            "the texts (LangChain's OpenAIEmbeddings sends OpenAI's token ids unless it is made with "
            "check_embedding_ctx_length=False)",
        )

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise problem("no_texts", "input must hold at least one text")
        empty = [i for i, text in enumerate([v] if isinstance(v, str) else v) if not text]
        if empty:  # OpenAI refuses them too: an empty text has no meaning to embed
            where = "input is" if isinstance(v, str) else f"input[{empty[0]}] is"
            raise problem("empty_text", f"{where} an empty string; leave empty texts out")
        return v

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lamina"
    #: Lamina's extensions: what the model can do and which registered version serves it
    capabilities: list[str] = Field(default_factory=list)
    version: str | None = None
    ready: bool = False


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
