"""Who may see the dashboard: an admin key, from a header or from the dashboard's own cookie.

The login form sends the key once, as JSON (``POST /ui/login``); the answer sets it in a cookie that is
``HttpOnly`` (no script reads it back), ``SameSite=Strict`` (no other site's page makes the browser send
it) and ``Secure`` behind HTTPS. The dashboard's writes (login, logout, the playground) take JSON only, as
every other route of the gateway: :class:`~lamina.application._access.SiteGuard` refuses any other media
type on a POST, and a page of another site cannot send JSON here without a CORS preflight that the gateway
never grants, so no CSRF token is needed. With no keys configured every request is the anonymous admin
(local use), as on the admin API.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from lamina.application._auth import Authenticator, bearer_token
from lamina.application._policy import Principal
from lamina.errors import AuthenticationError, LaminaError, PermissionDeniedError

COOKIE = "lamina_dashboard"
#: a login lasts a working day; the key itself stays valid until revoked
_MAX_AGE_S = 12 * 3600


def token_of(request: Request) -> str | None:
    """The key a dashboard request carries: its ``Authorization`` header, else the dashboard cookie."""
    return bearer_token(request) or request.cookies.get(COOKIE) or None


def _with_token(request: Request, token: str | None) -> Request:
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"authorization"]
    if token is not None:
        headers.append((b"authorization", b"Bearer " + token.encode("latin-1")))
    return Request({**request.scope, "headers": headers})


async def check_admin(auth: Authenticator, request: Request, token: str | None) -> Principal:
    """The admin whose key ``token`` is; AuthenticationError (401) or PermissionDeniedError (403) else."""
    try:
        probe = _with_token(request, token)
    except UnicodeEncodeError as exc:
        raise AuthenticationError("the key has characters no key has; paste the key again") from exc
    principal = await auth(probe)
    if not principal.is_admin:
        raise PermissionDeniedError(
            f"the key {principal.name!r} has the scope {principal.scope!r}; the dashboard needs a key "
            "created with `lamina keys create --scope admin`"
        )
    return principal


async def admitted(auth: Authenticator, request: Request) -> tuple[Principal | None, str]:
    """The admin behind a dashboard request, or None and why not (what the login page says)."""
    try:
        return await check_admin(auth, request, token_of(request)), ""
    except LaminaError as exc:
        return None, exc.message if token_of(request) is not None else ""


def set_login(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_login(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
