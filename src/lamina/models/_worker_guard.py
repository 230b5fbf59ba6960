"""The replica worker's gate: only the gateway that started the replica gets through.

Two checks in front of every endpoint, ``/health`` included (the controller's health checks carry the
secret too):

- ``Host`` must be ``127.0.0.1`` or ``localhost`` (Starlette's ``TrustedHostMiddleware``): a web page
  that rebinds its own DNS name to 127.0.0.1 makes the browser send that name as ``Host``, so it is
  refused with 400 before anything runs (a guard against DNS rebinding);
- the request must carry the replica's secret in ``X-Lamina-Replica-Secret`` (the handshake in
  ``lamina.orchestration``) or as a Bearer token (an OpenAI client's API key: the gateway's ``openai``
  relay to a replica in a pod), compared in constant time; anything else is a 401. Other local users can
  reach a loopback port, but they cannot read the secret, which only the gateway and the replica know.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from lamina.errors import AuthenticationError
from lamina.models._worker_app import error_response
from lamina.orchestration import SECRET_HEADER, secret_matches

#: the names a loopback replica may be called by
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


class SecretGate:
    """Refuses (401) every HTTP request without the replica's secret, and every other kind of connection
    (websockets) outright; lifespan events pass."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self._secret = secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
        elif scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
        elif secret_matches(_presented(Headers(scope=scope)), self._secret):
            await self.app(scope, receive, send)
        else:
            refused = AuthenticationError(
                "this replica serves only the gateway that started it: the request lacks the replica's "
                f"secret ({SECRET_HEADER}). Send requests through the gateway."
            )
            await error_response(refused)(scope, receive, send)


def _presented(headers: Headers) -> str | None:
    """The secret a request carries: in the handshake's header, or as a Bearer token (what an
    OpenAI-compatible client sends as its API key, as the gateway's ``openai`` relay to a pod does)."""
    secret = headers.get(SECRET_HEADER)
    if secret is None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        secret = token.strip() if scheme.lower() == "bearer" else None
    return secret


def gated(app: ASGIApp, secret: str | None, extra_hosts: Sequence[str] = ()) -> ASGIApp:
    """``app`` behind both checks: the Host name first (loopback, plus ``extra_hosts`` for a replica
    reached by another name, as a pod is), then the secret (None: a worker run by hand with
    ``--no-secret``, behind the Host check alone)."""
    inner = app if secret is None else SecretGate(app, secret)
    hosts = [*LOOPBACK_HOSTS, *extra_hosts]
    return TrustedHostMiddleware(inner, allowed_hosts=hosts, www_redirect=False)
