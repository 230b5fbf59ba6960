"""Access: which models and datasets a key reaches, and which sites may talk to the gateway at all.

The checks on a :class:`~lamina.application._policy.Principal` (``check_model``, ``check_dataset``,
``visible_models``) refuse with a 403 that names what the key may use instead.

:class:`SiteGuard` protects a gateway on a developer's machine from the web pages its browser opens. A page
on another site may send a "simple" cross-site request without asking first: a form post
(``application/x-www-form-urlencoded``, ``multipart/form-data`` or ``text/plain``). Every body the gateway
takes is JSON, so any other media type on a POST, PUT, PATCH or DELETE is refused (415), and a browser must
ask (CORS preflight) before sending JSON, which the gateway never allows. A page may also rebind its own
domain to 127.0.0.1 (DNS rebinding) and so become same-origin with the gateway; its requests then carry
the attacker's domain in ``Host``, which must be one of the allowed hosts (403). A request with an
``Origin`` header must come from an allowed origin (403): a page of the gateway's own hosts, or one listed
in ``server.allowed_origins``. Only headers are read, once; the body is never touched.

Starlette's ``TrustedHostMiddleware`` checks hosts too; it is not used because it answers in plain text
and checks neither origins nor media types, and a second pass over the headers would cost as much again.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

import psutil
from starlette.types import ASGIApp, Receive, Scope, Send

from lamina.application._errors import render
from lamina.application._policy import Principal
from lamina.application._ports import ModelCatalog, Route
from lamina.errors import LaminaError, PermissionDeniedError, UnsupportedMediaTypeError
from lamina.models import ModelCard

#: the names of this machine that no web page can claim (a rebound domain keeps its own name in Host)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "[::]"})
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_JSON = "application/json"


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names) if names else "none"


def check_model(principal: Principal, asked: str, route: Route) -> None:
    """403 unless the key may call the model ``asked`` (its name, deployment or registered version)."""
    allowed = principal.models
    if allowed is None or asked in allowed or route.deployment in allowed:
        return
    if route.model_version is not None and route.model_version in allowed:
        return
    raise PermissionDeniedError(
        f"the key {principal.name!r} may not use the model {asked!r}; it may use: {_listing(allowed)} "
        "(ask an admin for a key with this model: `lamina keys create --models ...`)",
        param="model",
    )


def visible_models(principal: Principal, catalog: ModelCatalog) -> list[ModelCard]:
    """The catalog's models the key may call (all of them for a key without a model list)."""
    cards = catalog.models()
    if principal.models is None:
        return cards
    reached = set(principal.models)
    for name in principal.models:
        try:
            reached.add(catalog.resolve(name).deployment)
        except LaminaError:
            continue  # a key may name a model that is not served now
    return [card for card in cards if card.id in reached or card.version in reached]


def check_listed(principal: Principal, catalog: ModelCatalog, asked: str, card: ModelCard) -> None:
    """403 unless the key may see the model card ``card`` (asked for as ``asked``)."""
    if principal.models is None or asked in principal.models:
        return
    if card.id not in {c.id for c in visible_models(principal, catalog)}:
        raise PermissionDeniedError(
            f"the key {principal.name!r} may not use the model {asked!r}; it may use: "
            f"{_listing(principal.models)}",
            param="model",
        )


def check_dataset(principal: Principal, ref: str, *, alias: str | None = None) -> None:
    """403 unless the key may read the dataset of ``ref`` (``NAME`` or ``NAME@VERSION``); ``alias``: the
    RAG model name that reads it for the request."""
    allowed = principal.datasets
    name = ref.partition("@")[0]
    if allowed is None or name in allowed or ref in allowed:
        return
    what = f"the dataset {name!r}"
    if alias is not None:
        what = f"the dataset {name!r}, which the model {alias!r} answers from"
    raise PermissionDeniedError(
        f"the key {principal.name!r} may not read {what}; it may read: {_listing(allowed)} "
        "(ask an admin for a key with this dataset: `lamina keys create --datasets ...`)",
        param="model" if alias is not None else "dataset",
    )


def gateway_hosts(bind_host: str, configured: Sequence[str] = ()) -> list[str]:
    """The Host names a gateway bound to ``bind_host`` answers to: this machine's loopback names, the
    bind address, ``configured`` (``server.allowed_hosts``); for a wildcard bind (0.0.0.0, ::) also the
    machine's name and the address of each of its interfaces (what probes and peers on the network use)."""
    hosts = [*LOCAL_HOSTS, *configured]
    if bind_host.strip().lower() in _WILDCARD_BINDS:
        hosts.append(socket.gethostname())
        for addrs in psutil.net_if_addrs().values():
            hosts += [a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
    else:
        hosts.append(bind_host)
    return list(dict.fromkeys(_normalized(h) for h in hosts))


def _normalized(host: str) -> str:
    """A host as it appears in a Host header without its port: lowercase, IPv6 in brackets."""
    host = host.strip().lower().rstrip(".")
    try:
        return f"[{ipaddress.IPv6Address(host)}]"
    except ValueError:
        return host


def _hostname(authority: str) -> str:
    """``host[:port]`` (a Host header, an origin's authority) without the port."""
    value = authority.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] or value
    name, colon, port = value.rpartition(":")
    return (name if colon and (port.isdigit() or not port) else value).rstrip(".")


class SiteGuard:
    """Pure ASGI middleware: refuses requests from other sites (see the module's note)."""

    def __init__(self, app: ASGIApp, hosts: Sequence[str], origins: Sequence[str] = ()) -> None:
        self.app = app
        patterns = [_normalized(h) for h in hosts]
        self._any_host = "*" in patterns
        self._hosts = frozenset(p for p in patterns if not p.startswith("*"))
        self._suffixes = tuple(p[1:] for p in patterns if p.startswith("*."))
        self._any_origin = "*" in origins
        self._origins = frozenset(o.strip().lower().rstrip("/") for o in origins)
        self._shown = _listing(p for p in patterns if p != "*")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = origin = media = None
        has_body = False
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"content-type":
                media = value.decode("latin-1")
            elif name == b"content-length":
                has_body = value.strip() != b"0"
            elif name == b"transfer-encoding":
                has_body = True
        error = self._host_error(host)
        if error is None and origin is not None:
            error = self._origin_error(origin, host)
        if error is None and scope["method"] in _WRITES:
            error = _media_error(media, has_body)
        if error is not None:
            await render(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _known(self, hostname: str) -> bool:
        return hostname in self._hosts or (bool(self._suffixes) and hostname.endswith(self._suffixes))

    def _host_error(self, host: str | None) -> LaminaError | None:
        if host is None:
            return PermissionDeniedError(
                "the request has no Host header; send one naming this gateway (HTTP/1.1 requires it)"
            )
        if self._any_host or self._known(_hostname(host)):
            return None
        return PermissionDeniedError(
            f"this gateway does not answer to the host {host!r} (it answers to: {self._shown}); reach it "
            "by one of those names, or add the name to server.allowed_hosts in lamina.yaml ('*' allows any)"
        )

    def _origin_error(self, origin: str, host: str | None) -> LaminaError | None:
        value = origin.strip().lower().rstrip("/")
        if self._any_origin or value in self._origins:
            return None
        scheme, sep, authority = value.partition("://")
        web = bool(sep) and scheme in ("http", "https")
        if web and (authority == (host or "").strip().lower() or self._known(_hostname(authority))):
            return None  # same origin, or a page of one of the gateway's own hosts
        return PermissionDeniedError(
            f"requests from the web origin {origin!r} are refused; if a web app on that origin should call "
            "this gateway, add it to server.allowed_origins in lamina.yaml"
        )


def _media_error(media: str | None, has_body: bool) -> LaminaError | None:
    if media is None:
        if not has_body:
            return None
    elif media.partition(";")[0].strip().lower() == _JSON:
        return None
    got = "no Content-Type" if media is None else f"Content-Type {media!r}"
    return UnsupportedMediaTypeError(
        f"the request body must be JSON: send the header `Content-Type: application/json` (got {got})"
    )
