"""Prompt templates in the metadata store (``prompt_versions``), and their use in a request.

Adding content that differs from the newest version makes version N+1 (1 for a new name); adding the same
content again changes nothing. ``NAME`` and ``NAME@latest`` mean the newest version, ``NAME@N`` version N.

A request names a template in the extension field ``lamina_template``: ``{"name": "support@2",
"variables": {...}}``. On ``/v1/chat/completions`` the rendered messages go before any messages the
client sent (a system prompt and few-shot turns, then the conversation); a ``prompt`` template becomes
one user message. On ``/v1/completions`` a ``prompt`` template is the prompt, and the client sends none.
The field is taken out of the body before anything else reads it: what the replica gets, and what the
guards, limits and token estimates see, is the rendered request. The replica never sees the template's
name (an OpenAI upstream would refuse an unknown field); the request's span carries
``lamina.template.name`` and ``lamina.template.version`` and an event with the rendered text (its first
``TRACE_CHARS`` characters), and the policies get ``Call.template`` (``name@version``).

Which version ``NAME`` means is looked up again after ``ttl_s`` (2 s), and each version is compiled once,
so a request in the steady state asks the database nothing.
"""

from __future__ import annotations

import builtins
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import anyio
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Row

from lamina.application._bounds import check_bounds, parse_bounded
from lamina.application._requests import invalid_fields
from lamina.application._templates import (
    TEMPLATE_FIELD,
    Compiled,
    PromptSpec,
    PromptVersion,
    Rendered,
    Renderer,
    checked_spec,
)
from lamina.clock import Clock, utcnow
from lamina.config import RequestLimitsConfig
from lamina.errors import ConflictError, InvalidRequestError, NotFoundError
from lamina.models import ChatCompletionRequest, CompletionRequest
from lamina.store import Store, prompt_versions

RequestT = TypeVar("RequestT", bound=BaseModel)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_VERSION = re.compile(r"^[0-9]{1,9}$")
#: the most of a rendered prompt a trace keeps (in the span event); the rest is counted, not kept
TRACE_CHARS = 2048
#: adds of one name racing each other: each conflict means another add went in, so n racers need n tries
_ADD_TRIES = 16


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name``, ``name@latest`` (None: the newest version) or ``name@3``."""
    name, _, version = ref.strip().partition("@")
    if not _NAME.match(name):
        raise InvalidRequestError(
            f"{ref!r} does not name a template; write NAME or NAME@VERSION (e.g. support@2), NAME in "
            "lowercase letters, digits, '.', '_' or '-'",
            param=f"{TEMPLATE_FIELD}.name",
        )
    if version in ("", "latest"):
        return name, None
    if not _VERSION.match(version) or int(version) < 1:
        raise InvalidRequestError(
            f"{ref!r}: a version is a number from 1, or `latest`, not {version!r}",
            param=f"{TEMPLATE_FIELD}.name",
        )
    return name, int(version)


def _record(row: Row[Any]) -> PromptVersion:
    spec = PromptSpec.model_validate(
        {
            "description": row.description,
            "messages": row.messages,
            "prompt": row.prompt,
            "variables": row.variables,
        }
    )
    return PromptVersion(row.name, row.version, spec, row.sha256, row.created_at)


class PromptStore:
    """The templates in ``store``: add (a new version when the content changed), list, get and render."""

    def __init__(
        self,
        store: Store,
        clock: Clock = utcnow,
        *,
        renderer: Renderer | None = None,
        ttl_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._clock = clock
        self.renderer = renderer or Renderer()
        self._ttl = ttl_s
        self._monotonic = monotonic
        #: name -> (its newest version, when that was looked up)
        self._latest: dict[str, tuple[int, float]] = {}

    def add(self, name: str, spec: PromptSpec) -> tuple[PromptVersion, bool]:
        """The version holding ``spec``'s content, and whether it is new (False: the newest already
        held it; its description is left as it was)."""
        parse_ref(name)
        if "@" in name:
            raise InvalidRequestError(f"name a template without a version (not {name!r}); versions are given")
        spec = checked_spec(self.renderer.env, spec)
        sha = spec.content_sha256()
        for attempt in range(_ADD_TRIES):
            try:
                return self._add(name, spec, sha)
            except ConflictError:  # another process added a version of this name at the same moment
                if attempt == _ADD_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _add(self, name: str, spec: PromptSpec, sha: str) -> tuple[PromptVersion, bool]:
        with self._store.begin() as conn:
            newest = self._newest(conn, name)
            if newest is not None and newest.sha256 == sha:
                return newest, False
            record = PromptVersion(
                name, 1 if newest is None else newest.version + 1, spec, sha, self._clock()
            )
            values = {**spec.model_dump(mode="json"), "name": name, "version": record.version, "sha256": sha}
            conn.execute(insert(prompt_versions).values(**values, created_at=record.created_at))
        return record, True

    def list(self) -> list[tuple[PromptVersion, int]]:
        """The newest version of each template, with how many versions it has, by name."""
        t = prompt_versions
        counts = select(t.c.name, func.max(t.c.version).label("top"), func.count().label("n")).group_by(
            t.c.name
        )
        latest = counts.subquery()
        query = (
            select(t, latest.c.n)
            .join(latest, (t.c.name == latest.c.name) & (t.c.version == latest.c.top))
            .order_by(t.c.name)
        )
        with self._store.begin() as conn:
            return [(_record(row), int(row.n)) for row in conn.execute(query)]

    def versions(self, name: str) -> builtins.list[PromptVersion]:
        """Every version of ``name``, oldest first (none: an empty list)."""
        query = (
            select(prompt_versions).where(prompt_versions.c.name == name).order_by(prompt_versions.c.version)
        )
        with self._store.begin() as conn:
            return [_record(row) for row in conn.execute(query)]

    def get(self, ref: str) -> PromptVersion:
        """``name``, ``name@latest`` or ``name@N``; NotFoundError naming it when there is none."""
        name, version = parse_ref(ref)
        with self._store.begin() as conn:
            return self._get(conn, name, version)

    def render(self, ref: str, variables: Mapping[str, Any]) -> Rendered:
        """``ref`` filled in with ``variables`` (from this thread: it may query the store)."""
        name, version = parse_ref(ref)
        compiled = self._cached(name, version) or self._load(name, version)
        return self.renderer.render(compiled, variables)

    async def render_async(self, ref: str, variables: Mapping[str, Any]) -> Rendered:
        """As :meth:`render`, for the event loop: a template not in memory is fetched on a worker thread."""
        name, version = parse_ref(ref)
        compiled = self._cached(name, version)
        if compiled is None:
            compiled = await anyio.to_thread.run_sync(self._load, name, version)
        return self.renderer.render(compiled, variables)

    def _cached(self, name: str, version: int | None) -> Compiled | None:
        if version is None:
            latest = self._latest.get(name)
            if latest is None or self._monotonic() - latest[1] >= self._ttl:
                return None
            version = latest[0]
        return self.renderer.cached(name, version)

    def _load(self, name: str, version: int | None) -> Compiled:
        with self._store.begin() as conn:
            record = self._get(conn, name, version)
        if version is None:
            self._latest[name] = (record.version, self._monotonic())
        return self.renderer.compile(record)

    def _newest(self, conn: Any, name: str) -> PromptVersion | None:
        t = prompt_versions
        row = conn.execute(select(t).where(t.c.name == name).order_by(t.c.version.desc()).limit(1)).first()
        return None if row is None else _record(row)

    def _get(self, conn: Any, name: str, version: int | None) -> PromptVersion:
        if version is None:
            record = self._newest(conn, name)
        else:
            t = prompt_versions
            row = conn.execute(select(t).where(t.c.name == name, t.c.version == version)).first()
            record = None if row is None else _record(row)
        if record is not None:
            return record
        newest = self._newest(conn, name) if version is not None else None
        if newest is None:
            raise NotFoundError(
                f"there is no prompt template named {name!r}; `lamina prompts list` shows the templates and "
                f"`lamina prompts add {name} --file F.yaml` adds one",
                param=f"{TEMPLATE_FIELD}.name",
            )
        raise NotFoundError(
            f"the prompt template {name!r} has no version {version} (its versions are 1 to "
            f"{newest.version}); `lamina prompts show {name}` shows the newest",
            param=f"{TEMPLATE_FIELD}.name",
        )


# -- in a request ------------------------------------------------------------------------------------------


class _JsonObject(RootModel[dict[str, Any]]):
    """Any JSON object: the body before its template is rendered and it is validated as a request."""


class TemplateRef(BaseModel):
    """The ``lamina_template`` field of a request."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="NAME, NAME@latest or NAME@VERSION.")
    variables: dict[str, Any] = Field(default_factory=dict)


async def parse_templated(
    raw: bytes,
    request_type: type[RequestT],
    limits: RequestLimitsConfig,
    prompts: PromptStore | None,
    span: trace.Span,
) -> tuple[dict[str, Any], RequestT, str | None]:
    """The body of ``raw`` with its ``lamina_template`` rendered into it, the body validated, and the
    template's ``name@version`` (None: the request named none). Every problem is a 400 naming it; an
    unknown template is a 404."""
    body, _ = parse_bounded(raw, _JsonObject, limits)
    wanted = body.pop(TEMPLATE_FIELD, None)
    ref = None
    if wanted is not None:
        rendered = await _render(prompts, wanted, request_type)
        _fill(body, rendered, request_type)
        check_bounds(body, limits)  # the rendered request meets the same limits as a client's own
        span.set_attributes(
            {"lamina.template.name": rendered.name, "lamina.template.version": rendered.version}
        )
        text = rendered.text
        span.add_event(
            "lamina.template.rendered",
            {"lamina.template.text": text[:TRACE_CHARS], "lamina.template.chars": len(text)},
        )
        ref = rendered.ref
    try:
        return body, request_type.model_validate(body), ref
    except ValidationError as exc:
        raise invalid_fields(exc.errors(include_url=False)) from None


async def _render(prompts: PromptStore | None, wanted: Any, request_type: type[BaseModel]) -> Rendered:
    try:
        spec = TemplateRef.model_validate(wanted)
    except ValidationError as exc:
        raise invalid_fields([{**e, "loc": (TEMPLATE_FIELD, *e["loc"])} for e in exc.errors()]) from None
    if not issubclass(request_type, ChatCompletionRequest | CompletionRequest):
        raise InvalidRequestError(
            f"`{TEMPLATE_FIELD}` works on /v1/chat/completions and /v1/completions only", param=TEMPLATE_FIELD
        )
    if prompts is None:
        raise InvalidRequestError(
            "prompt templates are not configured on this gateway; send the messages themselves",
            param=TEMPLATE_FIELD,
        )
    return await prompts.render_async(spec.name, spec.variables)


def _fill(body: dict[str, Any], rendered: Rendered, request_type: type[BaseModel]) -> None:
    """Put the rendered template into ``body`` (see the module's note for where it goes)."""
    if issubclass(request_type, ChatCompletionRequest):
        messages = rendered.messages or [{"role": "user", "content": rendered.prompt or ""}]
        sent = body.get("messages")
        if sent is None or isinstance(sent, list):  # anything else: left for validation to name
            body["messages"] = [*messages, *(sent or [])]
        return
    if rendered.prompt is None:
        raise InvalidRequestError(
            f"the template {rendered.ref} holds chat messages; use it on /v1/chat/completions, or add a "
            "template with a `prompt` for /v1/completions",
            param=f"{TEMPLATE_FIELD}.name",
        )
    if body.get("prompt") is not None:
        raise InvalidRequestError(
            f"send `prompt` or `{TEMPLATE_FIELD}`, not both; pass the text as one of the template's "
            "variables instead",
            param="prompt",
        )
    body["prompt"] = rendered.prompt
