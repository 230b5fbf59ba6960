"""Secrets in the config and in what is printed of it: marked fields and the passwords of URLs."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

#: What ``lamina config show`` (and error messages) print in place of a secret. A field is marked secret
#: with ``json_schema_extra={"secret": True}``.
REDACTED = "***"
#: ``scheme://user:password@``: the password of a URL's userinfo, taken up to the last ``@`` so that one
#: written unencoded never shows in part (a URL with an ``@`` in its query loses more, never less).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*):\S*@")
#: A secret passed as a query parameter (libpq's ``?password=``, a token in an endpoint URL).
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:password|passwd|pwd|sslpassword|secret|token|access_token|api[_-]?key|"
    r"access[_-]?key|key)=)[^&#\s]*",
    re.IGNORECASE,
)


def redact_url(text: str) -> str:
    """``text`` with the password of every URL in it, and secret query parameters, shown as ``***``.

    The user name, host, port and path stay visible: they say which server is meant.
    """
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['head']}{REDACTED}", text)


def mask_secrets(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (``model`` dumped) with the values of fields marked secret replaced, recursively."""
    for name, info in type(model).model_fields.items():
        value, dumped = getattr(model, name), data.get(name)
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("secret") is True:
            data[name] = [REDACTED] * len(dumped) if isinstance(dumped, list) else REDACTED
        elif isinstance(value, BaseModel) and isinstance(dumped, dict):
            mask_secrets(value, dumped)
        elif isinstance(value, list) and isinstance(dumped, list):
            for item, item_dumped in zip(value, dumped, strict=True):
                if isinstance(item, BaseModel) and isinstance(item_dumped, dict):
                    mask_secrets(item, item_dumped)
    return data


def scrub(data: Any) -> Any:
    """Every string in ``data`` (dicts and lists, recursively) through ``redact_url``."""
    if isinstance(data, str):
        return redact_url(data)
    if isinstance(data, dict):
        return {key: scrub(value) for key, value in data.items()}
    if isinstance(data, list):
        return [scrub(item) for item in data]
    return data
