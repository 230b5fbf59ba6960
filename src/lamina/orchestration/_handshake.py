"""The handshake between a backend and each replica it starts: a port the replica picked, and a secret.

A replica binds a loopback port of its own choosing (port 0) and reports the number to the backend over
a pipe that only the backend holds the other end of; picking a free port beforehand and passing it down
would leave a window in which another process could take it. The backend also hands each replica a
random secret of its own, in the environment (never in argv, which every local user can read with
``ps``; a process's environment is readable by its owner only), and the replica refuses any request
that does not carry it in :data:`SECRET_HEADER`. So another local user can neither call a replica
directly nor stand in for one: the gateway only sends the secret to the port that the replica it started
reported, and only trusts answers from there.

What a replica does, whatever it runs (the models layer's worker is one, a test's echo server another):

- read its secret from the environment variable :data:`SECRET_ENV`;
- bind ``127.0.0.1`` port 0, listen, then write one line ``{"port": N}`` to the file descriptor named
  by :data:`PORT_FD_ENV` and close it (:func:`report_port`);
- answer 401 to every request whose :data:`SECRET_HEADER` differs from the secret (``/health``
  included: the controller sends it too), comparing with :func:`secret_matches`.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from typing import Protocol

import httpx

#: the request header that carries the replica's secret
SECRET_HEADER = "X-Lamina-Replica-Secret"
#: the environment variable holding the replica's secret
SECRET_ENV = "LAMINA_REPLICA_SECRET"
#: the environment variable naming the file descriptor on which the replica reports its port
PORT_FD_ENV = "LAMINA_REPLICA_PORT_FD"
#: a report longer than this is not a port report
_MAX_REPORT_BYTES = 256


class ReplicaSecrets(Protocol):
    """Where the dispatcher finds the secret of the replica serving at a URL (a backend)."""

    def secret_for(self, url: str) -> str | None:
        """The secret of the live replica that reported ``url``; None when no live replica did."""
        ...


def new_secret() -> str:
    """A fresh random secret for one replica (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def secret_matches(sent: str | None, secret: str) -> bool:
    """Whether a request's header carries ``secret``, compared in constant time (no timing oracle)."""
    return sent is not None and hmac.compare_digest(sent.encode(), secret.encode())


def report_port(fd: int, port: int) -> None:
    """Write the replica's report (one JSON line) to the backend's pipe and close it."""
    data = (json.dumps({"port": port}) + "\n").encode()
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def parse_report(data: bytes) -> int:
    """The port in a replica's report; ValueError when it is not one ``{"port": N}`` line."""
    expected = f'expected one line {{"port": N}} with N a TCP port, got {data.strip()[:80]!r}'
    if len(data) > _MAX_REPORT_BYTES or not data.endswith(b"\n"):
        raise ValueError(expected)
    try:
        report = json.loads(data)
    except ValueError:
        raise ValueError(expected) from None
    port = report.get("port") if isinstance(report, dict) else None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(expected)
    return port


async def probe_health(
    http: httpx.AsyncClient, secrets: ReplicaSecrets, base_url: str | None, path: str, timeout_s: float
) -> str | None:
    """None when ``GET path`` on the replica answers 200 to a request carrying its secret, else what went
    wrong. A replica that has not reported its port yet (``base_url`` None) is still starting."""
    secret = secrets.secret_for(base_url) if base_url is not None else None
    if base_url is None or secret is None:
        return "it has not reported the port it serves on (yet)"
    url = base_url + path
    try:
        response = await http.get(url, headers={SECRET_HEADER: secret}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return f"GET {url} failed: {type(exc).__name__}: {exc}"
    return None if response.status_code == 200 else f"GET {url} answered HTTP {response.status_code}"
