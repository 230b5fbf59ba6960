"""Time, in one place: every timestamp Lamina records is an aware UTC datetime from a ``Clock``.

Code that records time takes a ``Clock`` in its constructor (``utcnow`` by default), so tests pass a fake
one instead of sleeping. Durations and deadlines use ``time.monotonic`` and are injected the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

#: Returns the current time as an aware UTC datetime.
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)
