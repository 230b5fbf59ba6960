"""Prompt templates as data: what one holds, the checks it passes when added, and its sandboxed render.

A template is chat ``messages`` (each ``content`` a Jinja2 template) or one plain ``prompt``, with a JSON
Schema per variable, required unless it has a ``default``. Variables are checked before rendering: one
missing, unknown or of the wrong type is a 400 naming it and the template.

Rendering runs in :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` (no ``_`` attributes, no
methods that mutate, so ``{{ ''.__class__ }}`` is a 400, not an escape) with ``StrictUndefined``,
autoescape off, ``trim_blocks``/``lstrip_blocks`` on (as chat templates have them), and constant folding
off (nothing runs when a template compiles). Each render has a deadline and an output bound, checked at
every call, attribute and item lookup, ``*``/``**`` and output chunk; ``range`` is capped at 100,000
items. A loop that does nothing at all over a client's list escapes the deadline: template authors (who
need the state directory) are trusted not to write one. Rejected alternative: a subprocess per render,
whose ~1 ms start would cost every request more than the render itself."""

from __future__ import annotations

import contextvars
import copy
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import jinja2
from jinja2 import StrictUndefined, meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lamina.errors import InvalidRequestError

#: the request field that names a template; never forwarded to the replica
TEMPLATE_FIELD = "lamina_template"
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_RESERVED = frozenset({"loop", "self", "caller", "varargs", "kwargs", "true", "false", "none"})
_MAX_SOURCE_CHARS = 100_000


class TemplateMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(description="A Jinja2 template.")


class PromptSpec(BaseModel):
    """What ``lamina prompts add`` takes (the YAML file's fields): ``messages`` or ``prompt``."""

    model_config = ConfigDict(extra="forbid")
    description: str = Field("", max_length=1000, description="What the template is for.")
    messages: list[TemplateMessage] | None = Field(None, min_length=1, description="Chat messages.")
    prompt: str | None = Field(None, description="A plain prompt (for /v1/completions).")
    variables: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="A JSON Schema per variable, required unless it has a `default`; "
        "none given: every variable the template uses, of any type, required.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> PromptSpec:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either `messages` (a chat template) or `prompt` (a plain one), not both")
        for name in self.variables:
            if not _VARIABLE.match(name) or name in _RESERVED:
                raise ValueError(
                    f"{name!r} cannot name a variable; use letters, digits and _ (not loop, self)"
                )
        return self

    def sources(self) -> list[str]:
        return [m.content for m in self.messages] if self.messages is not None else [self.prompt or ""]

    def content_sha256(self) -> str:
        """What a version's identity is: its templates and variables (not its description)."""
        content = self.model_dump(exclude={"description"})
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class PromptVersion:
    """One stored version of a template."""

    name: str
    version: int
    spec: PromptSpec
    sha256: str
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def kind(self) -> Literal["chat", "prompt"]:
        return "chat" if self.spec.messages is not None else "prompt"

    def required(self) -> list[str]:
        return [n for n, schema in self.spec.variables.items() if "default" not in schema]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "kind": self.kind,
            **self.spec.model_dump(),
            "required": self.required(),
            "sha256": self.sha256,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class Rendered:
    """A template filled in: chat messages, or a prompt."""

    name: str
    version: int
    messages: list[dict[str, str]] | None
    prompt: str | None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def text(self) -> str:
        if self.messages is None:
            return self.prompt or ""
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


# -- the sandbox -------------------------------------------------------------------------------------------


class _OverBound(Exception):
    """A render passed its deadline or its output bound."""


@dataclass
class _Bound:
    deadline: float
    chars_left: int
    monotonic: Callable[[], float]

    def tick(self) -> None:
        if self.monotonic() > self.deadline:
            raise _OverBound("took longer than its deadline")

    def spend(self, chars: int) -> None:
        self.chars_left -= chars
        if self.chars_left < 0:
            raise _OverBound("wrote more than its size bound")


_BOUND: contextvars.ContextVar[_Bound | None] = contextvars.ContextVar("lamina_template_bound", default=None)


def _tick() -> None:
    bound = _BOUND.get()
    if bound is not None:
        bound.tick()


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox with a per-render deadline and output bound (see the module's note)."""

    intercepted_binops = frozenset({"*", "**"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            seq, times = (left, right) if isinstance(left, str | list | tuple) else (right, left)
            bound = _BOUND.get()
            limit = bound.chars_left if bound is not None else _MAX_SOURCE_CHARS
            if isinstance(seq, str | list | tuple) and isinstance(times, int) and len(seq) * times > limit:
                raise _OverBound(f"would repeat {len(seq)} items {times} times, past its size bound")
        elif isinstance(left, int) and isinstance(right, int) and right * abs(left).bit_length() > 65536:
            raise _OverBound(f"would compute {left} ** {right}, too large a number")
        return super().call_binop(context, operator, left, right)


def _environment() -> _Sandbox:
    # optimized=False: no constant folding, so a template's constants are not evaluated when it compiles
    return _Sandbox(
        undefined=StrictUndefined, autoescape=False, optimized=False, trim_blocks=True, lstrip_blocks=True
    )


@dataclass(frozen=True)
class Compiled:
    version: PromptVersion
    templates: tuple[jinja2.Template, ...]
    checks: dict[str, Callable[[Any], str | None]]


def _check_of(schema: dict[str, Any]) -> Callable[[Any], str | None]:
    import jsonschema  # imported when the first template compiles (its import takes ~0.1 s)
    from jsonschema.exceptions import best_match

    validator = jsonschema.Draft202012Validator(schema)

    def check(value: Any) -> str | None:
        return None if validator.is_valid(value) else str(best_match(validator.iter_errors(value)).message)

    return check


def _type_of(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type", "any")
    return kind if isinstance(kind, str) else " or ".join(map(str, kind))


def _parsed_sources(env: jinja2.Environment, spec: PromptSpec) -> set[str]:
    """The variables the templates use; a syntax error is a 400 naming the template and line."""
    used: set[str] = set()
    for i, source in enumerate(spec.sources()):
        where = "prompt" if spec.messages is None else f"messages[{i}].content"
        try:
            used |= meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidRequestError(
                f"{where} is not a valid Jinja2 template: {exc.message} (line {exc.lineno}); fix it and add "
                "it again",
                param=where,
            ) from None
    return used - set(env.globals)


def checked_spec(env: jinja2.Environment, spec: PromptSpec) -> PromptSpec:
    """``spec`` with its variables declared (inferred when none are), or a 400 saying what is wrong."""
    import jsonschema
    from jsonschema.exceptions import SchemaError

    size = sum(map(len, spec.sources()))
    if size > _MAX_SOURCE_CHARS:
        raise InvalidRequestError(f"the template is {size} characters; at most {_MAX_SOURCE_CHARS} are kept")
    used = _parsed_sources(env, spec)
    if not spec.variables:
        return spec.model_copy(update={"variables": {name: {} for name in sorted(used)}})
    undeclared = sorted(used - set(spec.variables))
    if undeclared:
        raise InvalidRequestError(
            f"the template uses {', '.join(undeclared)}, which `variables` does not declare; declare them "
            f"(declared: {', '.join(spec.variables)}) or leave `variables` out to infer them",
            param="variables",
        )
    for name, schema in spec.variables.items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise InvalidRequestError(
                f"the variable {name!r} has an invalid JSON schema: {exc.message}", param=f"variables.{name}"
            ) from None
        if "default" in schema and (problem := _check_of(schema)(schema["default"])) is not None:
            raise InvalidRequestError(
                f"the default of {name!r} does not fit its schema: {problem}", param=f"variables.{name}"
            )
    return spec


class Renderer:
    """Compiles template versions (each once: versions never change) and renders them within bounds."""

    def __init__(
        self,
        *,
        max_render_s: float = 0.1,
        max_output_chars: int = 200_000,
        max_cached: int = 1000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.env = _environment()
        self.max_render_s = max_render_s
        self.max_output_chars = max_output_chars
        self._max_cached = max_cached
        self._monotonic = monotonic
        self._compiled: OrderedDict[tuple[str, int], Compiled] = OrderedDict()
        self._lock = threading.Lock()  # compiled on the gateway's worker threads, read on its event loop

    def cached(self, name: str, version: int) -> Compiled | None:
        with self._lock:
            compiled = self._compiled.get((name, version))
            if compiled is not None:
                self._compiled.move_to_end((name, version))
            return compiled

    def compile(self, pv: PromptVersion) -> Compiled:
        """``pv`` compiled, from the cache when it is there."""
        compiled = self.cached(pv.name, pv.version)
        if compiled is not None:
            return compiled
        compiled = Compiled(
            pv,
            tuple(self.env.from_string(source) for source in pv.spec.sources()),
            {name: _check_of(schema) for name, schema in pv.spec.variables.items()},
        )
        with self._lock:
            self._compiled[(pv.name, pv.version)] = compiled
            while len(self._compiled) > self._max_cached:
                self._compiled.popitem(last=False)
        return compiled

    def render(self, compiled: Compiled, variables: Mapping[str, Any]) -> Rendered:
        """The template filled in with ``variables``; a 400 names what stopped it."""
        pv = compiled.version
        values = _values(compiled, variables)
        bound = _Bound(self._monotonic() + self.max_render_s, self.max_output_chars, self._monotonic)
        token = _BOUND.set(bound)
        try:
            outputs = [_generate(template, values, bound) for template in compiled.templates]
        except _OverBound as exc:
            raise InvalidRequestError(
                f"rendering the template {pv.ref} stopped: it {exc} ({self.max_render_s} s, "
                f"{self.max_output_chars} characters); send smaller variables or simplify the template",
                param=f"{TEMPLATE_FIELD}.variables",
            ) from None
        except SecurityError as exc:
            raise InvalidRequestError(
                f"the template {pv.ref} tried what its sandbox forbids ({str(exc).rstrip('.')}); a "
                "template may read variables and call filters, never reach Python internals",
                param=f"{TEMPLATE_FIELD}.name",
            ) from None
        except Exception as exc:  # anything the template's own code raised: a fault of template or values
            raise InvalidRequestError(
                f"rendering the template {pv.ref} failed: {type(exc).__name__}: {exc}; check the variables "
                f"against `lamina prompts show {pv.ref}`",
                param=f"{TEMPLATE_FIELD}.variables",
            ) from None
        finally:
            _BOUND.reset(token)
        if pv.spec.messages is None:
            return Rendered(pv.name, pv.version, None, outputs[0])
        messages = [
            {"role": m.role, "content": text} for m, text in zip(pv.spec.messages, outputs, strict=True)
        ]
        return Rendered(pv.name, pv.version, messages, None)


def _generate(template: jinja2.Template, values: dict[str, Any], bound: _Bound) -> str:
    parts: list[str] = []
    for chunk in template.generate(values):
        bound.tick()
        bound.spend(len(chunk))
        parts.append(chunk)
    return "".join(parts)


def _values(compiled: Compiled, given: Mapping[str, Any]) -> dict[str, Any]:
    """The variables to render with (defaults filled in), or a 400 naming the first bad one."""
    pv = compiled.version
    param = f"{TEMPLATE_FIELD}.variables"
    unknown = sorted(set(given) - set(pv.spec.variables))
    if unknown:
        takes = ", ".join(f"{n} ({_type_of(s)})" for n, s in pv.spec.variables.items()) or "nothing"
        raise InvalidRequestError(
            f"the template {pv.ref} has no variable {unknown[0]!r}; it takes: {takes}",
            param=f"{param}.{unknown[0]}",
        )
    missing = [n for n in pv.required() if n not in given]
    if missing:
        needed = ", ".join(f"{n} ({_type_of(pv.spec.variables[n])})" for n in missing)
        raise InvalidRequestError(
            f"the template {pv.ref} needs the variables {needed}; send them in {param}",
            param=f"{param}.{missing[0]}",
        )
    values: dict[str, Any] = {}
    for name, schema in pv.spec.variables.items():
        if name not in given:
            values[name] = copy.deepcopy(schema["default"])
            continue
        problem = compiled.checks[name](given[name])
        if problem is not None:
            raise InvalidRequestError(
                f"the variable {name!r} of the template {pv.ref} is invalid: {problem}",
                param=f"{param}.{name}",
            )
        values[name] = given[name]
    return values
