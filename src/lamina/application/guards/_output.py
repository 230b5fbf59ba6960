"""Checks of a model's answer as a whole: its length, and whether it is JSON that fits a schema.

The JSON-schema check is what OpenAI's ``response_format: {"type": "json_schema"}`` promises a client:
the schema comes from the request (``for_request``) or from the guard's configuration, and is checked
with ``jsonschema`` (the draft the schema declares, 2020-12 when it declares none). Neither check can
redact: an answer that is too long or not valid is blocked (or flagged), never cut short silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lamina.application.guards._base import Finding, FindingGuard, GuardSettings


def estimate_tokens(text: str) -> int:
    """Tokens of ``text`` for a length limit, without a tokenizer: one per 4 bytes of UTF-8 (about what
    BPE tokenizers give for English; an estimate, stated as such in the config's description)."""
    return -(-len(text.encode()) // 4)


class LengthGuard(FindingGuard):
    """An answer over ``max_chars`` characters or about ``max_tokens`` tokens."""

    can_redact = False

    def __init__(
        self,
        settings: GuardSettings,
        *,
        name: str = "length",
        max_chars: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__(name, settings)
        if max_chars is None and max_tokens is None:
            raise ValueError(f"the guard {name!r} needs max_chars or max_tokens")
        self._max_chars = max_chars
        self._max_tokens = max_tokens

    def find(self, text: str) -> list[Finding]:
        if self._max_chars is not None and len(text) > self._max_chars:
            return [Finding("TOO_LONG", 1.0, self._max_chars, len(text))]
        if self._max_tokens is not None and estimate_tokens(text) > self._max_tokens:
            return [Finding("TOO_LONG", 1.0, 0, len(text))]
        return []


class JsonSchemaGuard(FindingGuard):
    """An answer that is not JSON, or not valid under ``schema``."""

    can_redact = False

    def __init__(self, settings: GuardSettings, *, schema: dict[str, Any], name: str = "json_schema") -> None:
        super().__init__(name, settings)
        import jsonschema  # imported when a json_schema guard is built (its import takes ~0.1 s)
        from jsonschema.exceptions import SchemaError

        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"the guard {name!r} has an invalid JSON schema: {exc.message}") from exc
        self._validator = cls(schema)

    @staticmethod
    def request_schema(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The schema of a request's ``response_format`` (``json_schema``), else None."""
        fmt = body.get("response_format")
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return None
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else None

    def find(self, text: str) -> list[Finding]:
        try:
            value = json.loads(text)
        except ValueError:
            return [Finding("INVALID_JSON", 1.0, 0, len(text))]
        error = next(iter(self._validator.iter_errors(value)), None)
        if error is None:
            return []
        return [Finding("SCHEMA_MISMATCH", 1.0, 0, len(text))]
