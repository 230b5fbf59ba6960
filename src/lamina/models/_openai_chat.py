"""The parts of a chat request: messages and their content, tools and tool choices, response formats.

Shared by the gateway (which validates requests) and the replica worker (which plans them onto an engine);
``Wire`` is the base of every request model: unknown fields are kept, and a null means the default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

#: a function's (and a JSON schema format's) name, as OpenAI allows it
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
#: content part types a message may hold; only text (and an assistant's refusal) reach a text-only model
PART_TYPES = ("text", "refusal", "image_url", "input_audio", "file")


def problem(kind: str, message: str) -> PydanticCustomError:
    """A validation error whose message is ours alone (no ``Value error,`` prefix)."""
    return PydanticCustomError(kind, message)


def _missing(message: str) -> PydanticCustomError:
    """A required-field error located at the field itself, for fields only some messages need."""
    return PydanticCustomError("missing", message)


class Wire(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """``"temperature": null`` is the default temperature, as OpenAI reads it."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None or k not in fields or fields[k].is_required() or fields[k].default is None
        }


class StreamOptions(Wire):
    include_usage: bool = False


class FunctionCallIn(Wire):
    name: str
    #: the arguments as the model wrote them: a JSON object in a string
    arguments: str


class ToolCallIn(Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(Wire):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    tool_calls: list[ToolCallIn] | None = None
    #: the legacy form of one tool call, on an assistant message
    function_call: FunctionCallIn | None = None
    tool_call_id: str | None = Field(None, validate_default=True)
    name: str | None = Field(None, validate_default=True)
    #: a string, or a list of content parts (``{"type": "text", "text": ...}`` and others)
    content: str | list[dict[str, Any]] | None = Field(None, validate_default=True)

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _assistant_calls(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("role") not in (None, "assistant"):
            raise problem("tool_calls_role", f"only assistant messages carry `{info.field_name}`")
        return v

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("role") == "tool":
            raise _missing("a `tool` message needs `tool_call_id`, the id of the tool call it answers")
        return v

    @field_validator("name")
    @classmethod
    def _function_name(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("role") == "function":
            raise _missing("a `function` message needs `name`, the function whose result it holds")
        return v

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[dict[str, Any]] | None, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if v is None and role in ("system", "developer", "user", "tool"):
            raise _missing(f"a `{role}` message needs `content`")
        for i, part in enumerate(v if isinstance(v, list) else ()):
            kind = part.get("type")
            if kind not in PART_TYPES:
                raise problem(
                    "content_part_type",
                    f"content part {i} has type {kind!r}; a part's type is one of {', '.join(PART_TYPES)}",
                )
            if kind in ("text", "refusal") and not isinstance(part.get(kind), str):
                raise problem("content_part", f'content part {i} is a {kind} part without a string "{kind}"')
        return v

    def text(self) -> str:
        """The message's text: the string, or its text (and refusal) parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p[p["type"]]) for p in self.content if p["type"] in ("text", "refusal"))

    def non_text_parts(self) -> list[tuple[int, str]]:
        """``(index, type)`` of each part that is not text: images, audio, files."""
        if not isinstance(self.content, list):
            return []
        return [(i, p["type"]) for i, p in enumerate(self.content) if p["type"] not in ("text", "refusal")]


class FunctionDef(Wire):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    #: a JSON Schema of the arguments (an object); absent: the function takes none
    parameters: dict[str, Any] | None = None
    #: OpenAI's strict mode: the arguments always match ``parameters``
    strict: bool | None = None


class ToolDef(Wire):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Wire):
    name: str


class NamedToolChoice(Wire):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(Wire):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_given(cls, v: JsonSchemaFormat | None, info: ValidationInfo) -> JsonSchemaFormat | None:
        if v is None and info.data.get("type") == "json_schema":
            raise _missing('`"type": "json_schema"` needs `json_schema`: {"name": ..., "schema": {...}}')
        return v
