"""The bounded, sampled window of request embeddings per dataset, kept in the metadata store.

The gateway offers every request that used a dataset (its prompt and embedding) to :class:`DriftWindow`;
``lamina data drift`` reads the samples of the last ``--window`` back, from another process if a stack is
running, or after a restart.

Why per time bucket: one reservoir over all history (Vitter's algorithm R) is a uniform sample of
everything ever seen, so after a month of traffic a new request enters it with probability capacity/N and
yesterday's traffic (the drift one wants to see) is barely in it. Instead time is cut into buckets (an
hour by default) and each bucket keeps its own reservoir of ``capacity / (retention / bucket)`` samples,
a uniform sample of that bucket's requests. Buckets older than the retention are deleted, so a dataset
never holds more than ``capacity`` samples. Each bucket also counts the requests it was offered, so a
window query can weight each sample by how many requests it stands for (busy hours are not
under-represented next to quiet ones).

Writes are serialised by a lock in this process (the gateway is the one writer); the counter and the
sample of one request change in one transaction.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import and_, delete, func, insert, select, update

from lamina.clock import Clock, utcnow
from lamina.data.vectors import check_dataset_name
from lamina.errors import InvalidRequestError
from lamina.store import Store, drift_buckets, drift_samples

#: Characters of a prompt kept with its sample (enough to show it as an example; lengths are kept whole).
MAX_SAMPLE_CHARS = 1000

_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_window(text: str) -> timedelta:
    """``"24h"``, ``"30m"``, ``"7d"``, ``"1d12h"`` (units s, m, h, d, w) as a timedelta."""
    cleaned = text.strip().lower()
    parts = _DURATION.findall(cleaned)
    if not parts or _DURATION.sub("", cleaned).strip():
        raise InvalidRequestError(
            f"cannot read the window {text!r}: use a number and a unit, e.g. 30m, 24h or 7d", param="window"
        )
    seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in parts)
    if seconds <= 0:
        raise InvalidRequestError(f"the window must be longer than zero, got {text!r}", param="window")
    return timedelta(seconds=seconds)


def since_of(text: str, now: datetime, name: str = "since") -> datetime:
    """A moment given as a duration back from ``now`` (``15m``, ``7d``) or as an ISO date or time (UTC when
    it names no zone); ``name`` is the option or parameter it came in, for the error."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            return now - parse_window(text)
        except InvalidRequestError:
            raise InvalidRequestError(
                f"cannot read {name} {text!r}: give a duration such as 15m or 7d, or an ISO date or time "
                "such as 2025-01-31 or 2025-01-31T12:00:00Z",
                param=name.lstrip("-"),
            ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    """How much traffic is kept per dataset."""

    #: Samples kept per dataset at most, over the whole retention.
    capacity: int = 10_000
    #: Width of one time bucket (one reservoir).
    bucket: timedelta = timedelta(hours=1)
    #: How long samples are kept: the longest ``--window`` that can be answered.
    retention: timedelta = timedelta(days=7)

    def __post_init__(self) -> None:
        if self.bucket.total_seconds() < 1 or self.retention < self.bucket:
            raise InvalidRequestError(
                f"drift window: bucket ({self.bucket}) must be at least 1s and at most the retention "
                f"({self.retention})"
            )
        if self.per_bucket < 1:
            raise InvalidRequestError(
                f"drift window: capacity {self.capacity} is smaller than the {self.buckets} buckets of the "
                "retention; raise the capacity or widen the bucket"
            )

    @property
    def buckets(self) -> int:
        return int(self.retention.total_seconds() // self.bucket.total_seconds())

    @property
    def per_bucket(self) -> int:
        return self.capacity // self.buckets


@dataclass(frozen=True, slots=True)
class Sample:
    """One sampled request; ``weight`` is how many requests of its bucket it stands for (>= 1)."""

    ts: datetime
    text: str
    length: int
    vector: npt.NDArray[np.float32]
    weight: float


class DriftWindow:
    """Record requests per dataset (the gateway) and read the window back (a drift check)."""

    def __init__(
        self,
        store: Store,
        *,
        policy: WindowPolicy | None = None,
        clock: Clock = utcnow,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.store = store
        self.policy = policy or WindowPolicy()
        self._clock = clock
        self._rng = rng if rng is not None else np.random.default_rng()
        self._lock = threading.Lock()

    def _bucket_of(self, ts: datetime) -> int:
        width = int(self.policy.bucket.total_seconds())
        return int(ts.timestamp()) // width * width

    def record(self, dataset: str, text: str, vector: Any) -> bool:
        """Offer one request to its bucket's reservoir; True if it was kept (possibly replacing another).

        Synchronous (one small transaction): call it off the request's critical path.
        """
        check_dataset_name(dataset)
        now = self._clock()
        bucket = self._bucket_of(now)
        blob = np.asarray(vector, dtype="<f4").tobytes()
        row = {"ts": now, "text": text[:MAX_SAMPLE_CHARS], "length": len(text), "vector": blob}
        with self._lock, self.store.begin() as conn:
            key = and_(drift_buckets.c.dataset == dataset, drift_buckets.c.bucket == bucket)
            seen = conn.execute(select(drift_buckets.c.seen).where(key)).scalar_one_or_none()
            if seen is None:
                conn.execute(insert(drift_buckets).values(dataset=dataset, bucket=bucket, seen=1))
                self._expire(conn, dataset, now)
                seen = 0
            else:
                conn.execute(update(drift_buckets).where(key).values(seen=seen + 1))
            if seen < self.policy.per_bucket:
                conn.execute(insert(drift_samples).values(dataset=dataset, bucket=bucket, slot=seen, **row))
                return True
            slot = int(self._rng.integers(0, seen + 1))  # algorithm R: keep with probability k/(seen+1)
            if slot >= self.policy.per_bucket:
                return False
            conn.execute(
                update(drift_samples)
                .where(
                    drift_samples.c.dataset == dataset,
                    drift_samples.c.bucket == bucket,
                    drift_samples.c.slot == slot,
                )
                .values(**row)
            )
            return True

    def _expire(self, conn: Any, dataset: str, now: datetime) -> None:
        """Delete the buckets that fell out of the retention (run when a new bucket opens)."""
        width = int(self.policy.bucket.total_seconds())
        oldest = self._bucket_of(now) - (self.policy.buckets - 1) * width  # this bucket is one of them
        for table in (drift_samples, drift_buckets):
            conn.execute(delete(table).where(table.c.dataset == dataset, table.c.bucket < oldest))

    def samples(self, dataset: str, window: timedelta) -> list[Sample]:
        """The samples of ``dataset`` taken in the last ``window``, oldest first."""
        now = self._clock()
        since = now - window
        with self.store.begin() as conn:
            seen = dict(
                conn.execute(
                    select(drift_buckets.c.bucket, drift_buckets.c.seen).where(
                        drift_buckets.c.dataset == dataset
                    )
                ).all()
            )
            rows = conn.execute(
                select(drift_samples)
                .where(drift_samples.c.dataset == dataset, drift_samples.c.ts >= since)
                .order_by(drift_samples.c.ts, drift_samples.c.slot)
            ).all()
        kept = self.policy.per_bucket
        result = []
        for r in rows:
            offered = max(int(seen.get(r.bucket, 1)), 1)
            if r.ts <= now:
                vector = np.frombuffer(r.vector, dtype="<f4")
                weight = offered / min(offered, kept)
                result.append(Sample(r.ts, r.text, r.length, vector, weight))
        return result

    def count(self, dataset: str) -> int:
        """Samples held for ``dataset`` (every bucket still kept)."""
        query = select(func.count()).select_from(drift_samples).where(drift_samples.c.dataset == dataset)
        with self.store.begin() as conn:
            return int(conn.execute(query).scalar_one())
