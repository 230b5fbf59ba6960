"""Where the response cache keeps its entries: in process, in the metadata store, or in Redis.

Each backend maps a key (a hex digest) to the bytes of one answer, serves it for ``ttl_s`` seconds and
keeps at most ``max_entries`` entries and ``max_bytes`` bytes, dropping the least recently used first.
An entry larger than ``max_bytes`` is not kept. The clock is injected (seconds, ``time.time`` by default).

In Redis the whole bookkeeping (the entry with its TTL, a sorted set of last uses, a hash of sizes and a
byte total) is changed by one Lua script per call, so gateways sharing the server see one consistent LRU.
The metadata store keeps the entries in the table ``cache_entries`` (migration 0006); its calls run in
a worker thread, like every other store call from the gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import (
    delete,
    func,
    select,
    update,
)

from lamina.config import redact_url
from lamina.errors import UnavailableError
from lamina.store import Store, cache_entries

Clock = Callable[[], float]


@dataclass(frozen=True)
class Bounds:
    ttl_s: float
    max_entries: int
    max_bytes: int


class CacheBackend(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The entry under ``key`` (counted as a use), or None when absent or expired."""
        ...

    async def put(self, key: str, value: bytes) -> None:
        """Keep ``value`` under ``key`` (replacing any), then evict down to the bounds."""
        ...

    async def aclose(self) -> None: ...


class MemoryBackend:
    """An LRU dict in this process."""

    def __init__(self, bounds: Bounds, clock: Clock = time.time) -> None:
        self.bounds = bounds
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[0] <= self.clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found[1]

    async def put(self, key: str, value: bytes) -> None:
        if key in self._entries:
            self._drop(key)
        if len(value) > self.bounds.max_bytes:
            return
        self._entries[key] = (self.clock() + self.bounds.ttl_s, value)
        self.bytes += len(value)
        while len(self._entries) > self.bounds.max_entries or self.bytes > self.bounds.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        self.bytes -= len(self._entries.pop(key)[1])

    async def aclose(self) -> None:
        self._entries.clear()
        self.bytes = 0


class StoreBackend:
    """The table ``cache_entries`` of the metadata store."""

    def __init__(self, store: Store, bounds: Bounds, clock: Clock = time.time) -> None:
        self.store = store
        self.bounds = bounds
        self.clock = clock

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._get, key, self.clock())

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self.bounds.max_bytes:
            return
        await asyncio.to_thread(self._put, key, value, self.clock())

    def _get(self, key: str, now: float) -> bytes | None:
        t = cache_entries
        with self.store.begin() as conn:
            row = conn.execute(select(t.c.value, t.c.expires_at).where(t.c.key == key)).first()
            if row is None:
                return None
            if row.expires_at <= now:
                conn.execute(delete(t).where(t.c.key == key))
                return None
            conn.execute(update(t).where(t.c.key == key).values(used_at=now))
            return bytes(row.value)

    def _put(self, key: str, value: bytes, now: float) -> None:
        t, b = cache_entries, self.bounds
        with self.store.begin() as conn:
            conn.execute(delete(t).where((t.c.key == key) | (t.c.expires_at <= now)))
            conn.execute(
                t.insert().values(
                    key=key, value=value, size_bytes=len(value), expires_at=now + b.ttl_s, used_at=now
                )
            )
            count, size = conn.execute(select(func.count(), func.coalesce(func.sum(t.c.size_bytes), 0))).one()
            if count <= b.max_entries and size <= b.max_bytes:
                return
            # walk from the least recently used, dropping until both bounds hold
            drop: list[str] = []
            for old_key, old_size in conn.execute(select(t.c.key, t.c.size_bytes).order_by(t.c.used_at)):
                if count <= b.max_entries and size <= b.max_bytes:
                    break
                drop.append(old_key)
                count, size = count - 1, size - old_size
            conn.execute(delete(t).where(t.c.key.in_(drop)))

    async def aclose(self) -> None:
        return None


_PUT = """
local p, key, value = KEYS[1], ARGV[1], ARGV[2]
local ttl_ms, now, max_entries, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6])
local lru, sizes, total = p .. ':lru', p .. ':sizes', p .. ':bytes'
local function forget(k)
  local size = redis.call('HGET', sizes, k)
  if size then redis.call('DECRBY', total, size) end
  redis.call('HDEL', sizes, k)
  redis.call('ZREM', lru, k)
  redis.call('DEL', p .. ':e:' .. k)
end
for _, k in ipairs(redis.call('ZRANGEBYSCORE', lru, '-inf', now - ttl_ms)) do forget(k) end
forget(key)
redis.call('SET', p .. ':e:' .. key, value, 'PX', ttl_ms)
redis.call('ZADD', lru, now, key)
redis.call('HSET', sizes, key, string.len(value))
redis.call('INCRBY', total, string.len(value))
while redis.call('ZCARD', lru) > max_entries or tonumber(redis.call('GET', total) or '0') > max_bytes do
  forget(redis.call('ZRANGE', lru, 0, 0)[1])
end
return 1
"""

_GET = """
local p, key, now = KEYS[1], ARGV[1], tonumber(ARGV[2])
local value = redis.call('GET', p .. ':e:' .. key)
if value then redis.call('ZADD', p .. ':lru', 'XX', now, key) end
return value
"""


class RedisBackend:
    """Entries in Redis, shared by every gateway using the same server and ``prefix``."""

    def __init__(
        self, url: str, bounds: Bounds, clock: Clock = time.time, prefix: str = "lamina:cache"
    ) -> None:
        self.url = url
        self.bounds = bounds
        self.clock = clock
        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0)
        self._get = self._redis.register_script(_GET)
        self._put = self._redis.register_script(_PUT)

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self._get(keys=[self.prefix], args=[key, self._now_ms()])
        except RedisError as exc:
            raise self._unreachable(exc) from exc
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self.bounds.max_bytes:
            return
        b = self.bounds
        args: list[str | bytes | int] = [
            key,
            value,
            max(1, round(b.ttl_s * 1000)),
            self._now_ms(),
            b.max_entries,
            b.max_bytes,
        ]
        try:
            await self._put(keys=[self.prefix], args=args)
        except RedisError as exc:
            raise self._unreachable(exc) from exc

    def _now_ms(self) -> int:
        return round(self.clock() * 1000)

    def _unreachable(self, exc: RedisError) -> UnavailableError:
        return UnavailableError(f"the response cache at {redact_url(self.url)} (Redis) failed: {exc}")

    async def aclose(self) -> None:
        await self._redis.aclose()
