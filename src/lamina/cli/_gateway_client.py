"""What the commands that talk to a running gateway share: its URL, the admin key, one way to call it."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer

from lamina.config import LaminaConfig
from lamina.errors import UnavailableError, from_body


def http_url(value: str | None) -> str | None:
    """A ``--url`` (or ``--gateway``) as given, once it is an http(s) URL: an option left without its
    value takes the next option's name, which would otherwise fail later as an unreachable stack."""
    if value is not None and not value.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{value!r} is not a URL; give the stack's, e.g. http://127.0.0.1:8000")
    return value


UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="The running gateway (default: http://server.host:server.port of the config).",
        callback=http_url,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="LAMINA_API_KEY",
        show_envvar=True,
        help="An admin key (default: the first of server.api_keys in the config, if any).",
    ),
]


def gateway_url(cfg: LaminaConfig, url: str | None) -> str:
    """``url`` without a trailing slash, else the config's bind address (a wildcard bind as loopback)."""
    if url:
        return url.rstrip("/")
    host = cfg.server.host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "*") else ("::1" if host == "::" else host)
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 address
    return f"http://{host}:{cfg.server.port}"


def auth_headers(cfg: LaminaConfig, api_key: str | None) -> dict[str, str]:
    key = api_key or (cfg.server.api_keys[0] if cfg.server.api_keys else None)
    return {"Authorization": f"Bearer {key}"} if key else {}


def unreachable(url: str, exc: httpx.TransportError) -> UnavailableError:
    return UnavailableError(
        f"no gateway answers at {url} ({type(exc).__name__}): start it with `lamina up`, or pass --url"
    )


def checked_json(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer; a gateway error body becomes its LaminaError (the message says what to
    do), anything else an UnavailableError."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and body is not None:
        return body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        raise from_body(response.status_code, body)
    raise UnavailableError(f"the gateway answered HTTP {response.status_code} without a JSON body")


def admin_get(cfg: LaminaConfig, url: str, path: str, api_key: str | None, **params: Any) -> dict[str, Any]:
    """The JSON of ``GET url + path`` (an admin route); an error body becomes its LaminaError, no answer
    an UnavailableError that says to start the stack or fix ``--url``."""
    base = url.rstrip("/")
    try:
        response = httpx.get(f"{base}{path}", params=params, headers=auth_headers(cfg, api_key), timeout=30)
    except httpx.TransportError as exc:
        raise unreachable(base, exc) from None
    body: dict[str, Any] = checked_json(response)
    return body
