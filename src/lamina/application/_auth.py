"""Authentication: who a request comes from, as a :class:`~lamina.application._policy.Principal`.

The gateway takes any :class:`Authenticator`; :class:`StaticKeys` is the one for ``server.api_keys``
(every key an admin, no limits), and with no keys at all every request is :data:`ANONYMOUS`. The
principal is kept on the request (``principal_of``) for the routes and policies that need it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from starlette.requests import Request

from lamina.application._policy import ANONYMOUS, Principal
from lamina.errors import AuthenticationError, PermissionDeniedError

_STATE_KEY = "lamina.principal"


class Authenticator(Protocol):
    async def __call__(self, request: Request) -> Principal:
        """The caller of ``request``; raises AuthenticationError (401) when it cannot say."""
        ...


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, else None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class StaticKeys:
    """``server.api_keys``: each key is an admin; none configured accepts every request as anonymous."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys]

    async def __call__(self, request: Request) -> Principal:
        if not self._keys:
            return ANONYMOUS
        given = (bearer_token(request) or "").encode()
        # compare_digest against every key: the time taken says nothing about which key nearly matched
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        if not any(matches):
            raise AuthenticationError(
                "missing or invalid API key; send the header `Authorization: Bearer <key>` with one of the "
                "keys in the gateway's server.api_keys"
            )
        return Principal(key_id=f"static-{matches.index(True)}", name="server.api_keys", scope="admin")


def authenticated(
    authenticator: Authenticator, *, admin: bool = False
) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that authenticates every request of a router and keeps the principal;
    ``admin`` also requires the admin scope (403 otherwise)."""

    async def dependency(request: Request) -> None:
        principal = await authenticator(request)
        if admin and not principal.is_admin:
            raise PermissionDeniedError(
                f"the key {principal.name!r} has the scope {principal.scope!r}; the admin API needs a key "
                "created with `lamina keys create --scope admin`"
            )
        request.scope[_STATE_KEY] = principal

    return dependency


def principal_of(request: Request) -> Principal:
    """The principal the router's dependency authenticated (ANONYMOUS where none ran)."""
    principal = request.scope.get(_STATE_KEY, ANONYMOUS)
    assert isinstance(principal, Principal)
    return principal
