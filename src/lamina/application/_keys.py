"""API keys: stored hashed in the metadata store (``api_keys``), and the authenticator that reads them.

A secret is ``lam-`` and 43 url-safe characters (256 random bits) and is shown once, when the key is
created or rotated. The store keeps its SHA-256 only: a secret that random cannot be guessed from its hash,
so a fast hash is right (GitHub and Stripe do the same); a slow password hash (bcrypt, argon2) would only
cost every request milliseconds. A key's public id (``key_`` and 12 characters) and its name identify it
in listings, logs and the admin API; the secret's first characters (``prefix``) help a person tell keys
apart.

:class:`KeyAuthenticator` keeps what it looked up in memory for ``ttl_s`` (2 s): a request in the steady
state costs a hash and a dict lookup, never a database query, and ``lamina keys revoke`` or ``rotate`` in
another process takes effect within ``ttl_s``. Unknown secrets are remembered as unknown too, for as long.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, get_args

import anyio
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Row
from starlette.requests import Request

from lamina.application._auth import StaticKeys, bearer_token
from lamina.application._policy import ANONYMOUS, Principal, Scope
from lamina.clock import Clock, utcnow
from lamina.errors import AuthenticationError, ConflictError, InvalidRequestError, NotFoundError
from lamina.store import Store, api_keys

BudgetPeriod = Literal["day", "week", "month"]
SECRET_PREFIX = "lam-"
_ID_PREFIX = "key_"
_SHOWN = len(SECRET_PREFIX) + 6
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


def hash_secret(secret: str) -> str:
    """The stored form of a secret: its SHA-256, hex (see the module's note on why a fast hash)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored, without its secret."""

    id: str
    name: str
    prefix: str
    scope: Scope
    #: model names the key may call and datasets it may read; None: all
    models: tuple[str, ...] | None
    datasets: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    budget_usd: float | None
    budget_period: BudgetPeriod | None
    expires_at: datetime | None
    created_at: datetime
    revoked_at: datetime | None

    def status(self, now: datetime) -> Literal["active", "revoked", "expired"]:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at is not None and self.expires_at <= now else "active"

    def principal(self) -> Principal:
        return Principal(
            key_id=self.id,
            name=self.name,
            scope=self.scope,
            models=None if self.models is None else frozenset(self.models),
            datasets=None if self.datasets is None else frozenset(self.datasets),
            rpm=self.rpm,
            tpm=self.tpm,
            budget_usd=self.budget_usd,
            budget_period=self.budget_period,
        )

    def to_json(self, now: datetime) -> dict[str, Any]:
        """What ``lamina keys list --json`` prints: everything but the secret, which is not stored."""
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "scope": self.scope,
            "status": self.status(now),
            "models": None if self.models is None else list(self.models),
            "datasets": None if self.datasets is None else list(self.datasets),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "budget_usd": self.budget_usd,
            "budget_period": self.budget_period,
            "expires_at": None if self.expires_at is None else self.expires_at.isoformat(),
            "created_at": self.created_at.isoformat(),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
        }


@dataclass(frozen=True)
class KeySpec:
    """What a new key may do; every field but the name has a default (a user key with no limits)."""

    name: str
    scope: Scope = "user"
    models: Sequence[str] | None = None
    datasets: Sequence[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    budget_period: BudgetPeriod | None = None
    expires_at: datetime | None = None

    def checked(self, now: datetime) -> KeySpec:
        """This spec, or InvalidRequestError naming the field and what to give instead."""
        if not _NAME.match(self.name):
            raise InvalidRequestError(
                f"the key name {self.name!r} is not valid; use 1 to 100 lowercase letters, digits, '.', '_' "
                "or '-', starting with a letter or digit",
                param="name",
            )
        if self.name.startswith(_ID_PREFIX):
            raise InvalidRequestError(
                f"the key name {self.name!r} starts with {_ID_PREFIX!r}, which marks key ids; pick another",
                param="name",
            )
        if self.scope not in get_args(Scope):
            raise InvalidRequestError(f"the scope {self.scope!r} is not admin or user", param="scope")
        for field, limit in (("rpm", self.rpm), ("tpm", self.tpm)):
            if limit is not None and limit < 1:
                raise InvalidRequestError(f"{field} must be at least 1 (got {limit})", param=field)
        _check_budget(self.budget_usd, self.budget_period)
        if self.expires_at is not None and self.expires_at <= now:
            raise InvalidRequestError(
                f"the expiry {self.expires_at.isoformat()} is in the past; give a later date or a "
                "duration such as 30d",
                param="expires_at",
            )
        return replace(self, models=_names(self.models), datasets=_names(self.datasets))


def _check_budget(usd: float | None, period: str | None) -> None:
    if (usd is None) != (period is None):
        raise InvalidRequestError(
            f"a budget needs both an amount and a period (got {usd!r} per {period!r}), e.g. 5/day",
            param="budget",
        )
    if usd is not None and not (usd > 0 and math.isfinite(usd)):
        raise InvalidRequestError(f"the budget must be more than 0 USD, finite (got {usd})", param="budget")
    if period is not None and period not in get_args(BudgetPeriod):
        raise InvalidRequestError(f"the budget period {period!r} is not day, week or month", param="budget")


def _names(values: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if values is None else tuple(sorted({v.strip() for v in values if v.strip()}))


def _record(row: Row[Any]) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        scope=row.scope,
        models=None if row.models is None else tuple(row.models),
        datasets=None if row.datasets is None else tuple(row.datasets),
        rpm=row.rpm,
        tpm=row.tpm,
        budget_usd=row.budget_usd,
        budget_period=row.budget_period,
        expires_at=row.expires_at,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


class KeyStore:
    """The keys in ``store``: create (the secret is returned once), list, get, revoke and rotate."""

    def __init__(self, store: Store, clock: Clock = utcnow) -> None:
        self._store = store
        self._clock = clock

    def create(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """A new key and its secret (shown to the caller once; only its hash is kept)."""
        now = self._clock()
        spec = spec.checked(now)
        secret = new_secret()
        record = KeyRecord(
            id=_ID_PREFIX + secrets.token_urlsafe(9),
            name=spec.name,
            prefix=secret[:_SHOWN],
            scope=spec.scope,
            models=None if spec.models is None else tuple(spec.models),
            datasets=None if spec.datasets is None else tuple(spec.datasets),
            rpm=spec.rpm,
            tpm=spec.tpm,
            budget_usd=spec.budget_usd,
            budget_period=spec.budget_period,
            expires_at=spec.expires_at,
            created_at=now,
            revoked_at=None,
        )
        with self._store.begin() as conn:
            if conn.execute(select(api_keys.c.id).where(api_keys.c.name == spec.name)).first():
                raise ConflictError(
                    f"a key named {spec.name!r} exists; pick another --name, or `lamina keys rotate "
                    f"{spec.name}` for a new secret",
                    param="name",
                )
            values = {**record.__dict__, "secret_hash": hash_secret(secret)}
            values["models"] = None if record.models is None else list(record.models)
            values["datasets"] = None if record.datasets is None else list(record.datasets)
            conn.execute(insert(api_keys).values(**values))
        return record, secret

    def list(self) -> list[KeyRecord]:
        """Every key, revoked and expired ones too, oldest first."""
        with self._store.begin() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.name))
            return [_record(row) for row in rows]

    def get(self, ref: str) -> KeyRecord:
        """The key whose id or name is ``ref``."""
        with self._store.begin() as conn:
            return self._get(conn, ref)

    def revoke(self, ref: str) -> KeyRecord:
        """Revoke the key ``ref`` for good (revoking it again changes nothing)."""
        with self._store.begin() as conn:
            record = self._get(conn, ref)
            if record.revoked_at is not None:
                return record
            now = self._clock()
            conn.execute(update(api_keys).where(api_keys.c.id == record.id).values(revoked_at=now))
        return replace(record, revoked_at=now)

    def rotate(self, ref: str) -> tuple[KeyRecord, str]:
        """A new secret for the key ``ref`` (same id, name and limits); the old secret stops working."""
        secret = new_secret()
        with self._store.begin() as conn:
            record = self._get(conn, ref)
            if record.revoked_at is not None:
                raise ConflictError(
                    f"the key {record.name!r} is revoked; create a new one with `lamina keys create`"
                )
            values = {"secret_hash": hash_secret(secret), "prefix": secret[:_SHOWN]}
            conn.execute(update(api_keys).where(api_keys.c.id == record.id).values(**values))
        return replace(record, prefix=secret[:_SHOWN]), secret

    def by_secret_hash(self, digest: str) -> KeyRecord | None:
        with self._store.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.secret_hash == digest)).first()
        return None if row is None else _record(row)

    def exists(self) -> bool:
        """Whether any key was ever created (revoked and expired ones count: they still close the door)."""
        with self._store.begin() as conn:
            return conn.execute(select(api_keys.c.id).limit(1)).first() is not None

    def _get(self, conn: Any, ref: str) -> KeyRecord:
        column = api_keys.c.id if ref.startswith(_ID_PREFIX) else api_keys.c.name
        row = conn.execute(select(api_keys).where(column == ref)).first()
        if row is None:
            raise NotFoundError(f"no key has the name or id {ref!r}; `lamina keys list` shows the keys")
        return _record(row)


@dataclass(frozen=True, slots=True)
class _Cached:
    record: KeyRecord | None
    principal: Principal | None
    fetched: float


class KeyAuthenticator:
    """Bearer secrets of :class:`KeyStore` keys, and of ``server.api_keys`` (each an admin, as
    :class:`StaticKeys` has them). With no key anywhere, every request is :data:`ANONYMOUS` (local use)."""

    def __init__(
        self,
        keys: KeyStore,
        static_keys: Sequence[str] = (),
        *,
        ttl_s: float = 2.0,
        max_cached: int = 10_000,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Clock = utcnow,
    ) -> None:
        self._keys = keys
        self._static = StaticKeys(static_keys) if static_keys else None
        self._ttl = ttl_s
        self._max = max_cached
        self._monotonic = monotonic
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._pending: dict[str, anyio.Event] = {}
        self._exists: tuple[bool, float] = (False, -float("inf"))

    async def __call__(self, request: Request) -> Principal:
        token = bearer_token(request)
        if self._static is not None and token is not None:
            try:
                return await self._static(request)
            except AuthenticationError:
                pass  # not one of server.api_keys: perhaps a stored key
        if self._static is None and not await self._any_keys():
            return ANONYMOUS
        if token is None:
            raise AuthenticationError(
                "missing API key; send the header `Authorization: Bearer <secret>` with a key from "
                "`lamina keys create`"
            )
        cached = await self._lookup(hash_secret(token))
        if cached.record is None or cached.principal is None:
            raise AuthenticationError(
                "invalid API key; check the secret you send as `Authorization: Bearer <secret>`, or create "
                "a key with `lamina keys create --name NAME` (secrets are shown once)"
            )
        record = cached.record
        if record.revoked_at is not None:
            raise AuthenticationError(
                f"the key {record.name!r} was revoked at {record.revoked_at:%Y-%m-%d %H:%M} UTC; ask an "
                "admin for a new key (`lamina keys create`)"
            )
        if record.expires_at is not None and record.expires_at <= self._clock():
            raise AuthenticationError(
                f"the key {record.name!r} expired at {record.expires_at:%Y-%m-%d %H:%M} UTC; ask an admin "
                "for a new key (`lamina keys create --expires ...`)"
            )
        return cached.principal

    async def _any_keys(self) -> bool:
        exists, fetched = self._exists
        if exists or self._monotonic() - fetched < self._ttl:
            return exists  # keys are revoked, never deleted: once there is one, there always is
        exists = await anyio.to_thread.run_sync(self._keys.exists)
        self._exists = (exists, self._monotonic())
        return exists

    async def _lookup(self, digest: str) -> _Cached:
        """The cached key of ``digest``; one query per secret per ``ttl_s``, however many ask at once."""
        while True:
            cached = self._cache.get(digest)
            if cached is not None and self._monotonic() - cached.fetched < self._ttl:
                return cached
            pending = self._pending.get(digest)
            if pending is None:
                break
            await pending.wait()  # another request is fetching it; then look again
        self._pending[digest] = event = anyio.Event()
        try:
            record = await anyio.to_thread.run_sync(self._keys.by_secret_hash, digest)
            principal = None if record is None else record.principal()
            cached = _Cached(record, principal, self._monotonic())
            self._remember(digest, cached)
            return cached
        finally:
            del self._pending[digest]
            event.set()

    def _remember(self, digest: str, cached: _Cached) -> None:
        if len(self._cache) >= self._max:
            now = self._monotonic()
            self._cache = {d: c for d, c in self._cache.items() if now - c.fetched < self._ttl}
            if len(self._cache) >= self._max:
                self._cache.clear()
        self._cache[digest] = cached
