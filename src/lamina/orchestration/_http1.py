"""A small HTTP/1.1 client for the gateway's hop to its own replica workers.

The gateway talks to processes it started, on loopback, in one dialect (uvicorn's HTTP/1.1: JSON requests;
answers with a length, or chunked for streams). A general client pays for what this hop never needs
(redirects, cookies, auth flows, proxies, URL normalisation, HTTP/2, a readability poll of every pooled
connection before each request: httpx and httpcore together took about half of the gateway's own CPU for a
forwarded request). This one writes the request in one ``write`` and parses the answer with httptools
(llhttp, the parser uvicorn itself uses) on an ``asyncio.Protocol``; idle connections are kept per origin.
Answers come back as ``httpx.Response`` objects, whole or streaming, and failures as httpx's exceptions,
so the dispatcher's failover reads them as it reads httpx's.

A connection the replica closed while idle is noticed by the event loop (``connection_lost``), not polled
for; one that closes just as a request goes out (before any byte of the answer) is retried on a fresh
connection, since the replica most likely closed it idle. If no fresh connection can be made, the process
is gone, perhaps killed by this very request: the first error is raised, so the dispatcher counts the
request as sent (and checks whether the replica died of it) rather than as never delivered. Idle
connections older than ``idle_s`` are dropped before uvicorn's own keep-alive timeout (5 s) can close them
under a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import httpx

#: buffered body bytes of a streaming answer above which reading from the socket pauses
_HIGH_WATER = 1 << 20


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = time.monotonic()
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.started = False  # a byte of the answer came
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.readable = asyncio.Event()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but is one

    def data_received(self, data: bytes) -> None:
        self.started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"the replica's answer does not parse: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            reason = f"the replica closed the connection mid-answer ({exc or 'end of stream'})"
            error: Exception = httpx.ReadError(reason) if self.started else httpx.RemoteProtocolError(reason)
            self._fail(error)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        self.readable.set()
        if self.buffered > _HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()  # asked later, the parser has moved on
        self.readable.set()

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
        self.readable.set()

    # the client's side
    def send(self, request: bytes) -> None:
        self._reset()
        assert self.transport is not None
        self.transport.write(request)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The answer's body as it comes; the connection is done when this ends without an error."""
        while True:
            while self.body:
                chunk = self.body.popleft()
                self.buffered -= len(chunk)
                if self.buffered <= _HIGH_WATER and self.transport is not None and not self.closed:
                    self.transport.resume_reading()
                yield chunk
            if self.error is not None:
                raise self.error
            if self.complete:
                return
            self.readable.clear()
            await self.readable.wait()

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    """A streaming answer's body; closing it early closes the connection (the rest is never read)."""

    def __init__(self, client: Http1Client, origin: tuple[str, int], conn: _Connection) -> None:
        self._client, self._origin, self._conn = client, origin, conn
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._conn.chunks():
            yield chunk
        self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._client._release(self._origin, self._conn)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._conn.close()


class Http1Client:
    """``post`` and ``stream`` over pooled HTTP/1.1 connections to ``http://host:port`` origins."""

    def __init__(self, *, connect_timeout_s: float = 5.0, idle_s: float = 4.0, max_idle: int = 64) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._idle_s = idle_s
        self._max_idle = max_idle
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._closed = False

    async def post(
        self, url: str, *, json: Any = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """POST ``json`` and read the whole answer."""
        origin, conn = await self._exchange(url, json, headers)
        try:
            body = b"".join([chunk async for chunk in conn.chunks()])
        except BaseException:
            conn.close()
            raise
        self._release(origin, conn)
        return httpx.Response(conn.status, headers=conn.headers, content=body)

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, url: str, *, json: Any = None, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """POST ``json`` and yield the answer once its head is in, its body streaming."""
        if method != "POST":
            raise ValueError(f"only POST is sent to replicas, not {method}")
        origin, conn = await self._exchange(url, json, headers)
        body = _Body(self, origin, conn)
        try:
            yield httpx.Response(conn.status, headers=conn.headers, stream=body)
        finally:
            await body.aclose()

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def _exchange(
        self, url: str, json: Any, headers: Mapping[str, str] | None
    ) -> tuple[tuple[str, int], _Connection]:
        """Send the request and wait for the answer's head, on a pooled connection or a new one."""
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise httpx.UnsupportedProtocol(f"replicas are reached over plain http, not {url!r}")
        origin = (parts.hostname, parts.port or 80)
        request = _request(parts.netloc, parts.path or "/", json, headers)
        closed: Exception | None = None  # a pooled connection closed as the request went out
        while True:
            conn, reused = self._pooled(origin), True
            if conn is None:
                try:
                    conn, reused = await self._connect(origin), False
                except httpx.ConnectError:
                    if closed is not None:  # the process is gone: it may have died of this very request
                        raise closed from None
                    raise
            conn.send(request)
            try:
                await conn.head
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                conn.close()
                if reused and not conn.started:  # closed while idle, most likely: try a fresh connection
                    closed = exc
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return origin, conn

    def _pooled(self, origin: tuple[str, int]) -> _Connection | None:
        conns = self._idle.get(origin)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if not conn.closed and now - conn.idle_since < self._idle_s:
                return conn
            conn.close()
        return None

    async def _connect(self, origin: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(_Connection, *origin)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {origin[0]}:{origin[1]} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {origin[0]}:{origin[1]}: {exc}") from exc
        return conn

    def _release(self, origin: tuple[str, int], conn: _Connection) -> None:
        conns = self._idle.setdefault(origin, [])
        if conn.reusable and not self._closed and len(conns) < self._max_idle:
            conn.idle_since = time.monotonic()
            conns.append(conn)
        else:
            conn.close()


def _request(netloc: str, path: str, json: Any, headers: Mapping[str, str] | None) -> bytes:
    body = jsonlib.dumps(json, separators=(",", ":"), allow_nan=False).encode("ascii")
    lines = [f"POST {path} HTTP/1.1", f"Host: {netloc}", "Content-Type: application/json"]
    lines.append(f"Content-Length: {len(body)}")
    for name, value in (headers or {}).items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"the header {name!r} has a line break in it")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
