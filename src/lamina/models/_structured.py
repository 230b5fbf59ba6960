"""Structured outputs: GBNF grammars (root rule ``root``) that hold llama.cpp's output to a JSON Schema.

The conversion is llama.cpp's own json_schema_to_grammar, as ported by llama-cpp-python
(``llama_cpp.llama_grammar.SchemaConverter``), not a second converter. That port skips what it cannot
enforce without a word, so every schema is walked first: a keyword the grammar would not enforce is a 400
naming it (its path in the request), and the walk hands the converter a prepared copy with three repairs:

- bounds on integers and numbers become rules of their own (``_grammar_numbers``), which the port lacks;
- a ``pattern`` is anchored (JSON Schema patterns match anywhere) and its escapes spelled the way GBNF reads
  them (``\\d`` as ``[0-9]``, ``\\.`` as ``[\\x2E]``);
- ``$defs`` names get a scope prefix, so several schemas (a tool's parameters each) share one grammar
  without the port mixing up two definitions of one name; a one-member ``allOf`` is inlined.

Annotations (``title``, ``description``, ``default``, ``examples``, ``format``, ...) are accepted and ignored,
as JSON Schema allows; the formats ``date``, ``time``, ``date-time`` and ``uuid`` are also enforced. Strict
schemas follow OpenAI's rules (every object closed with ``additionalProperties: false``, every property
required, an object at the root): what ``client.beta.chat.completions.parse`` and LangChain send.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from llama_cpp.llama_grammar import RESERVED_NAMES, BuiltinRule, SchemaConverter

from lamina.errors import InvalidRequestError
from lamina.models._grammar_numbers import integer_rule, number_rule

#: keywords that describe and constrain nothing: accepted, ignored
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly"}
    | {"writeOnly", "format", "contentEncoding", "contentMediaType", "discriminator", "$defs", "definitions"}
)
#: keywords the grammar enforces
_ENFORCED = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems"}
    | {"enum", "const", "anyOf", "oneOf", "allOf", "$ref", "pattern", "minLength", "maxLength"}
    | {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
)
#: keywords that take a value which constrains nothing
_NO_OPS = {"uniqueItems": False, "minProperties": 0, "minContains": 1}
#: keywords that decide the whole value: the port ignores other constraints beside them
_DECISIVE = ("$ref", "anyOf", "oneOf", "const", "enum")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_CLASSES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r"}
#: a character of a JSON string: the port's rule also lets raw control characters (a newline) through,
#: which JSON forbids and parsers (``json.loads``, pydantic) reject; this is llama.cpp's current rule
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
#: what ``.`` matches in a pattern: a character that needs no escaping inside a JSON string
_PLAIN_CHAR = r'[^"\x5C\x00-\x1F\x7F]'
#: where a prepared schema carries the rule the walk built for it (a bounded number)
_RULE = "x-lamina-gbnf"
#: the schema of ``json_object`` mode: any JSON object
ANY_OBJECT: Mapping[str, Any] = MappingProxyType({"type": "object"})


def _bad(path: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"`{path}`: {message}; change the schema and send the request again", param=path
    )


@dataclass(frozen=True)
class _Walk:
    """One schema's walk: where it sits in the request, its scope for $defs names, whether it is strict."""

    scope: str
    strict: bool
    #: the whole schema, which its references point into
    root: Mapping[str, Any]

    def node(self, node: Any, path: str) -> dict[str, Any]:
        """The prepared copy of the schema at ``path``, or a 400 naming the keyword it cannot enforce."""
        if not isinstance(node, dict):
            raise _bad(path, f"a schema must be a JSON object, not {json.dumps(node)}")
        node = self._inline_all_of(node, path)
        for key, value in node.items():
            if key in _ANNOTATIONS or key.startswith("x-"):
                continue
            if key not in _ENFORCED and (key not in _NO_OPS or _NO_OPS[key] != value):
                raise _bad(f"{path}.{key}", f"the keyword `{key}` cannot be enforced on generated text")
        self._check_combination(node, path)
        out = {k: v for k, v in node.items() if k != _RULE}
        for key in ("properties", "$defs", "definitions"):
            if isinstance(node.get(key), dict):
                scoped = key != "properties"
                out[key] = {
                    (f"{self.scope}-{k}" if scoped else k): self.node(v, f"{path}.{key}.{k}")
                    for k, v in node[key].items()
                }
            elif key in node:
                raise _bad(f"{path}.{key}", f"`{key}` must map names to schemas")
        for key in ("anyOf", "oneOf", "prefixItems"):
            if key in node:
                if not isinstance(node[key], list) or not node[key]:
                    raise _bad(f"{path}.{key}", f"`{key}` must be a non-empty list of schemas")
                out[key] = [self.node(v, f"{path}.{key}.{i}") for i, v in enumerate(node[key])]
        if "items" in node:
            items = node["items"]
            out["items"] = (
                [self.node(v, f"{path}.items.{i}") for i, v in enumerate(items)]
                if isinstance(items, list)
                else self.node(items, f"{path}.items")
            )
        if isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = self.node(
                node["additionalProperties"], f"{path}.additionalProperties"
            )
        if "$ref" in node:
            out["$ref"] = self._ref(node["$ref"], f"{path}.$ref")
        if "pattern" in node:
            out["pattern"] = self._pattern(node["pattern"], f"{path}.pattern")
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise _bad(f"{path}.enum", "`enum` must be a non-empty list")
        if any(b in node for b in _BOUNDS):
            rule = self._bounded(node, path)
            if rule is not None:
                out[_RULE] = rule
        if self.strict:
            self._check_strict(node, path)
        return out

    @staticmethod
    def _inline_all_of(node: dict[str, Any], path: str) -> dict[str, Any]:
        members = node.get("allOf")
        if members is None:
            return node
        if not isinstance(members, list) or not members:
            raise _bad(f"{path}.allOf", "`allOf` must be a non-empty list of schemas")
        if len(members) == 1 and isinstance(members[0], dict):
            rest = {k: v for k, v in node.items() if k != "allOf"}
            return {**rest, **members[0]}
        if all(isinstance(m, dict) and ("properties" in m or "$ref" in m) for m in members):
            return node  # the port merges the properties of object members
        raise _bad(f"{path}.allOf", "`allOf` is enforced only over object schemas (each with `properties`)")

    @staticmethod
    def _check_combination(node: dict[str, Any], path: str) -> None:
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
        if not all(isinstance(k, str) and k in _TYPES for k in kinds) or (
            isinstance(kind, list) and not kind
        ):
            raise _bad(
                f"{path}.type", f"`type` must be one of {', '.join(sorted(_TYPES))}, or a list of them"
            )
        constraints = [k for k in node if k in _ENFORCED and k != "type"]
        decisive = next((k for k in _DECISIVE if k in node), None)
        others = [k for k in constraints if k != decisive]
        if decisive is not None and others:
            raise _bad(path, f"`{decisive}` cannot be combined with `{others[0]}` in one schema; nest them")
        if isinstance(kind, list) and len(kind) > 1 and constraints:
            raise _bad(path, f"a list of types cannot be combined with `{constraints[0]}`; use anyOf")
        if "pattern" in node and ("minLength" in node or "maxLength" in node):
            raise _bad(
                path, "`pattern` cannot be combined with minLength/maxLength; put the length in the pattern"
            )

    def _ref(self, ref: Any, path: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise _bad(path, f"only references inside the schema (#/$defs/...) are followed, not {ref!r}")
        parts = ref.split("/")
        target: Any = self.root
        for part in parts[1:]:
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list):  # the converter follows names only
                raise _bad(path, f"{ref!r} steps into a list; put that schema under $defs and point there")
            if not isinstance(target, dict) or key not in target:
                raise _bad(path, f"{ref!r} points at nothing in the schema: it has no {key!r} there")
            target = target[key]
        if parts[1] in ("$defs", "definitions") and len(parts) > 2:
            parts[2] = f"{self.scope}-{parts[2]}"
        return "/".join(parts)

    @staticmethod
    def _pattern(pattern: Any, path: str) -> str:
        """``pattern`` in the dialect the port reads: anchored, with escapes GBNF accepts."""
        if not isinstance(pattern, str):
            raise _bad(path, "`pattern` must be a string")
        body = pattern.removeprefix("^")
        body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
        out, i, in_class = [], 0, False
        while i < len(body):
            c = body[i]
            if c == "\\" and i + 1 < len(body):
                e = body[i + 1]
                if e in _CLASSES:
                    out.append(_CLASSES[e] if in_class else f"[{_CLASSES[e]}]")
                elif e.isalnum():
                    raise _bad(path, f"the escape \\{e} in the pattern {pattern!r} cannot be enforced")
                else:
                    out.append(f"\\x{ord(e):02X}" if in_class else f"[\\x{ord(e):02X}]")
                i += 2
                continue
            if c in "()" and body[i + 1 : i + 2] == "?":
                raise _bad(path, f"the group syntax (?...) in the pattern {pattern!r} cannot be enforced")
            in_class = (in_class or c == "[") and c != "]"
            out.append(_PLAIN_CHAR if c == "." and not in_class else c)
            i += 1
        start = "" if pattern.startswith("^") else f"{_PLAIN_CHAR}*"
        end = "" if pattern.endswith("$") and not pattern.endswith("\\$") else f"{_PLAIN_CHAR}*"
        return f"^{start}({''.join(out)}){end}$"

    @staticmethod
    def _bounded(node: dict[str, Any], path: str) -> str | None:
        """The rule of a bounded integer or number; None where bounds do not apply (a string's)."""
        for b in _BOUNDS:
            if b in node and (isinstance(node[b], bool) or not isinstance(node[b], int | float)):
                raise _bad(f"{path}.{b}", f"`{b}` must be a number")
        kind = node.get("type")
        if kind not in ("integer", "number"):
            if kind is None or isinstance(kind, list):
                raise _bad(path, "bounds (minimum, maximum, ...) need `type` integer or number beside them")
            return None
        lo, hi = node.get("minimum"), node.get("maximum")
        xlo, xhi = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
        try:
            if kind == "integer":
                lows = [v for v in (lo, None if xlo is None else math.floor(xlo) + 1) if v is not None]
                highs = [v for v in (hi, None if xhi is None else math.ceil(xhi) - 1) if v is not None]
                return integer_rule(max(lows, default=None), min(highs, default=None))
            if (lo is not None and xlo is not None) or (hi is not None and xhi is not None):
                raise ValueError(
                    "give a number either an inclusive or an exclusive bound on each side, not both"
                )
            return number_rule(
                lo if xlo is None else xlo, xlo is not None, hi if xhi is None else xhi, xhi is not None
            )
        except ValueError as exc:
            raise _bad(path, str(exc)) from None

    @staticmethod
    def _check_strict(node: dict[str, Any], path: str) -> None:
        """OpenAI's strict mode: closed objects whose every property is required."""
        if node.get("type") != "object" and "properties" not in node:
            return
        if node.get("additionalProperties") is not False:
            raise _bad(path, "strict mode needs `additionalProperties: false` on every object")
        missing = [k for k in node.get("properties", {}) if k not in node.get("required", [])]
        if missing:
            raise _bad(
                f"{path}.required",
                f"strict mode needs every property in `required`; missing {', '.join(map(repr, missing))} "
                '(make a property optional with anyOf [..., {"type": "null"}])',
            )


class _Converter(SchemaConverter):
    """The port's converter, taking the rules the walk built for bounded numbers."""

    def visit(self, schema: dict[str, Any], name: str) -> str:
        rule = schema.get(_RULE)
        if rule is None:
            return str(super().visit(schema, name))  # type: ignore[no-untyped-call]
        rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
        return str(self._add_rule(rule_name, f"{rule} space"))  # type: ignore[no-untyped-call]

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        if name == "char":
            rule = BuiltinRule(_JSON_CHAR, [])
        return str(super()._add_primitive(name, rule))


class GrammarBuilder:
    """One grammar built from several schemas and hand-written rules; ``grammar(root)`` ends it."""

    def __init__(self) -> None:
        self._converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)  # type: ignore[no-untyped-call]
        self._scopes = 0

    def schema(self, schema: Mapping[str, Any], name: str, where: str, *, strict: bool = False) -> str:
        """Add the rules matching ``schema`` (found at ``where`` in the request); returns its rule's name."""
        self._scopes += 1
        scope = f"s{self._scopes}"
        if strict and schema.get("type") != "object":
            raise _bad(where, "a strict schema must have `type: object` at its root")
        try:
            whole = copy.deepcopy(dict(schema))
            prepared = _Walk(scope, strict, whole).node(whole, where)
            resolved = self._converter.resolve_refs(prepared, scope)
            return self._converter.visit(resolved, name)
        except (AssertionError, KeyError, ValueError, TypeError, RecursionError) as exc:
            raise _bad(
                where, f"the schema cannot be turned into a grammar ({type(exc).__name__}: {exc})"
            ) from None

    def rule(self, name: str, body: str) -> str:
        """Add a hand-written rule; returns its name (made unique if taken)."""
        return str(self._converter._add_rule(name, body))  # type: ignore[no-untyped-call]

    def literal(self, text: str) -> str:
        """``text`` as a GBNF string literal."""
        return str(self._converter._format_literal(text))  # type: ignore[no-untyped-call]

    def grammar(self, root: str) -> str:
        """The GBNF text, whose ``root`` rule is ``root`` (an expression over the rules added)."""
        return f"root ::= {root}\n{self._converter.format_grammar()}\n"  # type: ignore[no-untyped-call]


def schema_grammar(schema: Mapping[str, Any], where: str, *, strict: bool = False) -> str:
    """The grammar of one JSON value matching ``schema``; a 400 naming what it cannot enforce."""
    builder = GrammarBuilder()
    return builder.grammar(builder.schema(schema, "answer", where, strict=strict))
