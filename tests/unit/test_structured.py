"""Structured outputs: JSON Schemas (and tool calls) as GBNF grammars that llama.cpp itself accepts.

Acceptance is checked the way an engine would use a grammar: ``llama_sampler_init_grammar`` on the vocabulary
of the bundled SmolLM2 (loaded vocabulary-only), whose result is null when llama.cpp rejects the grammar.
The bounded-number rules are checked against every value in a range by reading them as regular expressions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, Literal

import llama_cpp
import pytest
from openai import pydantic_function_tool
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import BaseModel, Field

from lamina.errors import InvalidRequestError
from lamina.models._grammar_numbers import integer_rule, number_rule
from lamina.models._openai import ChatCompletionRequest
from lamina.models._request_plan import chat_grammar
from lamina.models._structured import ANY_OBJECT, GrammarBuilder, schema_grammar
from lamina.models._tools import tool_plan
from tests.support import smollm2_path

Accepts = Callable[[str], bool]


@pytest.fixture(scope="module")
def accepts() -> Iterator[Accepts]:
    """Whether llama.cpp builds a grammar sampler from a grammar, on SmolLM2's vocabulary."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(smollm2_path()).encode(), params)
    assert model, "the bundled SmolLM2 GGUF did not load"
    vocab = llama_cpp.llama_model_get_vocab(model)

    def check(grammar: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    yield check
    llama_cpp.llama_model_free(model)


class Place(BaseModel):
    city: str
    country: str | None = None


class Event(BaseModel):
    """Everything pydantic commonly puts in a schema."""

    name: str = Field(description="what happens")
    when: Literal["am", "pm"]
    where: Place
    also: list[Place] = Field(max_length=3)
    guests: int = Field(ge=0, le=300)
    score: float = Field(ge=0, le=1)
    price: float = Field(gt=0)
    code: str = Field(pattern=r"^\d{3}-[a-z\.]+$")
    site: str = Field(pattern=r"\w+\.com")
    day: str = Field(json_schema_extra={"format": "date"})
    note: str = Field(min_length=1, max_length=20)


def strict_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The schema ``client.beta.chat.completions.parse(response_format=model)`` sends."""
    fmt: Any = type_to_response_format_param(model)
    return dict(fmt["json_schema"]["schema"])


SCHEMAS: list[tuple[str, dict[str, Any], bool]] = [
    ("any object (json_object mode)", dict(ANY_OBJECT), False),
    ("openai parse, strict", strict_schema(Event), True),
    ("pydantic, not strict", Event.model_json_schema(), False),
    (
        "recursive $defs",
        {
            "type": "object",
            "properties": {"root": {"$ref": "#/$defs/Tree"}},
            "$defs": {
                "Tree": {
                    "type": "object",
                    "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Tree"}}},
                }
            },
        },
        False,
    ),
    (
        "arrays, tuples, unions, consts",
        {
            "type": "object",
            "properties": {
                "a": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": -5},
                    "minItems": 1,
                    "maxItems": 3,
                },
                "t": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}]},
                "u": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "k": {"const": "fixed"},
                "n": {"type": ["string", "null"]},
                "m": {"type": "object", "additionalProperties": {"type": "number"}},
                "id": {"type": "string", "format": "uuid"},
            },
            "required": ["a"],
        },
        False,
    ),
]


@pytest.mark.parametrize(("label", "schema", "strict"), SCHEMAS, ids=[s[0] for s in SCHEMAS])
def test_schema_grammars_are_accepted_by_llama_cpp(
    accepts: Accepts, label: str, schema: dict[str, Any], strict: bool
) -> None:
    grammar = schema_grammar(schema, "response_format.json_schema.schema", strict=strict)
    assert grammar.startswith("root ::= ")
    assert accepts(grammar), grammar


def test_a_broken_grammar_is_rejected_by_the_check(accepts: Accepts) -> None:
    assert not accepts("root ::= undefined-rule")


def test_strings_exclude_raw_control_characters() -> None:
    """JSON forbids a raw newline in a string; the port's own rule would let the model write one."""
    grammar = schema_grammar({"type": "object", "properties": {"s": {"type": "string"}}}, "x")
    char = next(line for line in grammar.splitlines() if line.startswith("char ::="))
    assert r"\x00-\x1F" in char


def test_bounds_become_rules() -> None:
    grammar = schema_grammar(strict_schema(Event), "x", strict=True)
    assert 'answer-score ::= ("0" ("." [0-9]{1,15})? | "1" ("." "0"{1,15})?) space' in grammar
    assert "answer-guests ::= ([0-9] | [1-9] [0-9]{1} |" in grammar


SAME_DEF = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"]}


def test_two_schemas_with_one_def_name_keep_their_own_definitions(accepts: Accepts) -> None:
    builder = GrammarBuilder()
    first = {**SAME_DEF, "$defs": {"P": {"type": "object", "properties": {"a": {"type": "string"}}}}}
    second = {**SAME_DEF, "$defs": {"P": {"type": "object", "properties": {"b": {"type": "integer"}}}}}
    a, b = builder.schema(first, "one", "x"), builder.schema(second, "two", "y")
    grammar = builder.grammar(f"{a} | {b}")
    assert accepts(grammar)
    assert '"\\"a\\""' in grammar and '"\\"b\\""' in grammar


#: a reference into a list (the converter follows names only)
P0 = "#/properties/t/prefixItems/0"


@pytest.mark.parametrize(
    ("schema", "param", "says"),
    [
        (
            {"type": "object", "properties": {"a": {"type": "number", "multipleOf": 2}}},
            "s.properties.a.multipleOf",
            "multipleOf",
        ),
        ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "s.properties.a.not", "`not`"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "s.patternProperties", "patternProperties"),
        (
            {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
            "s.properties.a.uniqueItems",
            "uniqueItems",
        ),
        (
            {"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}},
            "s.properties.a.$ref",
            "inside the schema",
        ),
        (
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}, "$defs": {"B": {}}},
            "s.properties.a.$ref",
            "points at nothing in the schema: it has no 'Missing' there",
        ),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, "s.properties.a.$ref", "no '$defs'"),
        (
            {
                "type": "object",
                "properties": {"t": {"type": "array", "prefixItems": [{}]}, "c": {"$ref": P0}},
            },
            "s.properties.c.$ref",
            "steps into a list; put that schema under $defs",
        ),
        ({"type": "object", "properties": {"a": {"type": "strng"}}}, "s.properties.a.type", "`type` must be"),
        (
            {"type": "object", "properties": {"a": {"type": "number", "minimum": -1.5}}},
            "s.properties.a",
            "whole",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 4}}},
            "s.properties.a",
            "no integer",
        ),
        (
            {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}], "minLength": 1}}},
            "s.properties.a",
            "combined",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)y"}}},
            "s.properties.a.pattern",
            "(?",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string", "pattern": r"\bword"}}},
            "s.properties.a.pattern",
            r"\b",
        ),
        ({"type": "object", "allOf": [{"type": "string"}, {"minLength": 2}]}, "s.allOf", "allOf"),
        (
            {"type": "object", "properties": {"a": {"type": "object", "nullable": True}}},
            "s.properties.a.nullable",
            "nullable",
        ),
    ],
)
def test_what_a_grammar_cannot_enforce_is_a_400_naming_the_keyword(
    schema: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        schema_grammar(schema, "s")
    assert err.value.param == param
    assert says in err.value.message


def test_annotations_and_no_op_keywords_are_accepted(accepts: Accepts) -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "T",
        "type": "object",
        "properties": {"a": {"type": "string", "format": "email", "examples": ["x@y.z"], "x-extra": 1}},
        "uniqueItems": False,
        "discriminator": {"propertyName": "a"},
    }
    assert accepts(schema_grammar(schema, "s"))


@pytest.mark.parametrize(
    ("schema", "param", "says"),
    [
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            "s",
            "additionalProperties",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                "required": ["a"],
                "additionalProperties": False,
            },
            "s.required",
            "'b'",
        ),
        ({"type": "array", "items": {"type": "string"}}, "s", "type: object"),
    ],
)
def test_strict_schemas_follow_openais_rules(schema: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        schema_grammar(schema, "s", strict=True)
    assert (err.value.param, says in err.value.message) == (param, True)


def test_what_openai_and_langchain_send_for_strict_outputs_passes() -> None:
    """LangChain's with_structured_output sends pydantic's ``minimum`` inside a strict schema."""
    langchain_like = strict_schema(Event)
    langchain_like["properties"]["guests"]["minimum"] = 0
    schema_grammar(langchain_like, "s", strict=True)


def _regex(grammar: str) -> re.Pattern[str]:
    """The bounded-number rules (literals, classes, repeats, groups) read as a regular expression."""
    token = re.compile(r'"([^"]*)"|(\[[^\]]*\])|(\{[0-9,]*\})|([()|?])|(\s+)')
    parts, end = [], 0
    for m in token.finditer(grammar):
        assert m.start() == end, f"unexpected text in {grammar!r} at {end}"
        end = m.end()
        literal, klass, repeat, op, _ = m.groups()
        if literal is not None:
            parts.append(f"(?:{re.escape(literal)})")
        elif klass or repeat:
            parts.append(klass or repeat)
        elif op:
            parts.append("(?:" if op == "(" else op)
    assert end == len(grammar)
    return re.compile("".join(parts))


@pytest.mark.parametrize(
    ("lo", "hi"),
    [
        (0, None),
        (1, None),
        (18, 120),
        (0, 255),
        (-5, 5),
        (None, -3),
        (-120, -18),
        (7, 7),
        (99, 1000),
        (None, 10),
        (-1000, None),
    ],
)
def test_integer_rules_match_exactly_the_range(lo: int | None, hi: int | None) -> None:
    pattern = _regex(integer_rule(lo, hi))
    for n in range(-1500, 1500):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(pattern.fullmatch(str(n))) == inside, n
    for numeral in ("01", "00", "1.0", "-", "", "+1"):
        assert not pattern.fullmatch(numeral)
    if hi is None:
        assert pattern.fullmatch("9" * 16) and not pattern.fullmatch("9" * 17)


NUMERALS = [str(i) for i in range(13)] + [
    f"{i}.{f}" for i in range(13) for f in ("0", "00", "5", "05", "001", "9")
]


@pytest.mark.parametrize(
    ("lo", "lo_x", "hi", "hi_x"),
    [
        (0, False, 1, False),
        (0, True, None, False),
        (0, False, None, False),
        (1, False, 10, True),
        (0, True, 1, True),
        (2, False, 2, False),
        (None, False, 5, False),
        (3, True, 11, False),
    ],
)
def test_number_rules_match_exactly_the_range(lo: int | None, lo_x: bool, hi: int | None, hi_x: bool) -> None:
    pattern = _regex(number_rule(lo, lo_x, hi, hi_x))
    for numeral in NUMERALS + ["-" + n for n in NUMERALS if not n.startswith("0")]:
        x = Decimal(numeral)
        above = lo is None or (x > lo if lo_x else x >= lo)
        below = hi is None or (x < hi if hi_x else x <= hi)
        assert bool(pattern.fullmatch(numeral)) == (above and below), numeral


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((0.5, False, 1, False), "whole"),
        ((-1, False, 1, False), "negative"),
        ((1, True, 1, False), "no number"),
    ],
)
def test_number_bounds_that_cannot_be_enforced_say_why(args: tuple[Any, bool, Any, bool], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        number_rule(*args)


TOOLS = [
    pydantic_function_tool(Place, name="get_weather"),
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a"],
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": TOOLS, "tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {"tools": TOOLS, "response_format": {"type": "json_object"}},
        {"functions": [t["function"] for t in TOOLS], "function_call": {"name": "add"}},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "Event", "schema": strict_schema(Event), "strict": True},
            }
        },
    ],
    ids=["required", "named", "auto-with-json", "legacy-named", "json-schema"],
)
def test_chat_grammars_are_accepted_by_llama_cpp(accepts: Accepts, fields: dict[str, Any]) -> None:
    req = chat(**fields)
    grammar = chat_grammar(req, tool_plan(req))
    assert grammar is not None
    assert accepts(grammar), grammar


def test_a_forced_call_grammar_holds_the_named_function_only() -> None:
    req = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}})
    grammar = chat_grammar(req, tool_plan(req))
    assert grammar is not None
    assert grammar.splitlines()[0] == 'root ::= "<tool_call>\\n" (add-call) "\\n</tool_call>"'
    assert "get-weather" not in grammar
