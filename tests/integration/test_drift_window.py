"""The drift window: per-bucket reservoirs in the metadata store (SQLite and PostgreSQL), a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from lamina.data.drift import MAX_SAMPLE_CHARS, DriftWindow, WindowPolicy, parse_window
from lamina.errors import InvalidRequestError
from lamina.store import Store
from tests.support import FakeClock

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)


# 4 buckets of one hour, 3 samples each
SMALL = WindowPolicy(capacity=12, bucket=timedelta(hours=1), retention=timedelta(hours=4))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("24h", 86400), ("30m", 1800), ("7d", 604800), ("1d12h", 129600), (" 90s ", 90), ("2w", 1209600)],
)
def test_parse_window(text: str, seconds: int) -> None:
    assert parse_window(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "24", "h", "24x", "-1h", "0h", "24h and more"])
def test_parse_window_refuses(text: str) -> None:
    with pytest.raises(InvalidRequestError, match="window"):
        parse_window(text)


def test_policy_splits_the_capacity_over_buckets() -> None:
    assert WindowPolicy().per_bucket == 10_000 // 168
    assert SMALL.buckets == 4 and SMALL.per_bucket == 3
    with pytest.raises(InvalidRequestError, match="capacity"):
        WindowPolicy(capacity=3, retention=timedelta(hours=4))
    with pytest.raises(InvalidRequestError, match="bucket"):
        WindowPolicy(bucket=timedelta(days=2), retention=timedelta(days=1))


def test_records_until_full_then_samples(store: Store) -> None:
    clock = FakeClock(T0)
    window = DriftWindow(store, policy=SMALL, clock=clock, rng=np.random.default_rng(0))
    kept = [window.record("docs", f"prompt {i}", [float(i), 1.0]) for i in range(50)]
    assert kept[:3] == [True, True, True]
    assert 0 < sum(kept[3:]) < 47  # algorithm R keeps some later requests, not all
    samples = window.samples("docs", timedelta(hours=1))
    assert len(samples) == 3 == window.count("docs")
    assert all(s.weight == pytest.approx(50 / 3) for s in samples)
    assert samples[0].vector.dtype == np.float32 and samples[0].vector.shape == (2,)


def test_reservoir_is_uniform_over_the_bucket(store: Store) -> None:
    policy = WindowPolicy(capacity=20, bucket=timedelta(hours=1), retention=timedelta(hours=2))
    window = DriftWindow(store, policy=policy, clock=FakeClock(T0), rng=np.random.default_rng(1))
    for i in range(200):
        window.record("docs", str(i), [float(i)])
    kept = sorted(int(s.text) for s in window.samples("docs", timedelta(hours=1)))
    assert len(kept) == 10
    assert 50 < np.mean(kept) < 150  # uniform over 0..199: mean 99.5 (sd 18); the first 10 only: 4.5


def test_window_queries_by_time_and_expires_old_buckets(store: Store) -> None:
    clock = FakeClock(T0)
    window = DriftWindow(store, policy=SMALL, clock=clock, rng=np.random.default_rng(2))
    for hour in range(6):
        window.record("docs", f"hour {hour}", [1.0])
        clock.advance(hours=1)
    # now = T0 + 6h; retention 4h: buckets before T0 + 2h are gone (expired when a new bucket opened)
    everything = window.samples("docs", timedelta(days=1))
    assert [s.text for s in everything] == ["hour 2", "hour 3", "hour 4", "hour 5"]
    assert [s.text for s in window.samples("docs", timedelta(hours=2))] == ["hour 4", "hour 5"]
    assert all(s.ts.tzinfo is not None for s in everything)
    assert window.count("docs") <= SMALL.capacity


def test_datasets_are_separate_and_texts_truncated(store: Store) -> None:
    window = DriftWindow(store, policy=SMALL, clock=FakeClock(T0))
    long = "x" * (MAX_SAMPLE_CHARS + 500)
    window.record("docs", long, [0.5, 0.5])
    window.record("other", "short", [0.1, 0.2])
    (sample,) = window.samples("docs", timedelta(hours=1))
    assert len(sample.text) == MAX_SAMPLE_CHARS and sample.length == MAX_SAMPLE_CHARS + 500
    assert [s.text for s in window.samples("other", timedelta(hours=1))] == ["short"]
    with pytest.raises(InvalidRequestError):
        window.record("bad name!", "x", [1.0])


def test_samples_survive_a_restart(store: Store) -> None:
    clock = FakeClock(T0)
    DriftWindow(store, policy=SMALL, clock=clock).record("docs", "kept", [0.25, -1.5])
    reopened = Store(store.url)
    try:
        (sample,) = DriftWindow(reopened, policy=SMALL, clock=clock).samples("docs", timedelta(hours=1))
    finally:
        reopened.close()
    assert sample.text == "kept"
    assert sample.vector.tolist() == [0.25, -1.5]
