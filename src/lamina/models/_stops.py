"""Stop strings in generated text: cut at the first one, never send part of one."""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    """Cuts generated text at the first stop string, holding back text that may be a stop's beginning.

    Without the hold-back, a stop string split over two tokens would already have been sent in part.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop string was hit."""
        if not self._stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        keep = max((self._overlap(s) for s in self._stops), default=0)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        """What was held back, once generation ended without a stop."""
        out, self._pending = self._pending, ""
        return out

    def _overlap(self, stop: str) -> int:
        for n in range(min(len(stop) - 1, len(self._pending)), 0, -1):
            if self._pending.endswith(stop[:n]):
                return n
        return 0
