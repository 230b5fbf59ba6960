"""A fake clock for the code that takes ``lamina.clock.Clock`` or ``time.monotonic``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class FakeClock:
    """A clock that moves only when told (or by ``tick`` seconds each time it is read).

    ``clock()`` is the wall time (an aware UTC datetime, what ``lamina.clock.Clock`` returns);
    ``clock.monotonic()`` the same instant in seconds, for code that takes ``time.monotonic``.
    """

    def __init__(self, start: datetime = T0, *, tick: float = 0.0) -> None:
        self.now = start
        self.tick = tick

    def __call__(self) -> datetime:
        now = self.now
        self.advance(self.tick)
        return now

    def monotonic(self) -> float:
        return self().timestamp()

    def advance(self, seconds: float = 0.0, **delta: float) -> None:
        self.now += timedelta(seconds=seconds, **delta)
