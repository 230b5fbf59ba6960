"""The gateway hands freed heap memory back to the OS (glibc's malloc_trim), now and then."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from lamina.stack import _memory
from lamina.stack._memory import malloc_trim, trim_memory_forever


def _rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(malloc_trim() is None, reason="no malloc_trim in this C library (not glibc)")
def test_trim_returns_freed_heap_pages_to_the_os() -> None:
    trim = malloc_trim()
    assert trim is not None
    blocks = [bytearray(8192) for _ in range(10_000)]  # 80 MiB from malloc's heap, every page touched
    kept = blocks[
        ::50
    ]  # what stays pins the heap: freeing the rest leaves holes the heap's top cannot give back
    del blocks
    before = _rss_mib()
    trim()
    after = _rss_mib()
    assert before - after > 40, (before, after)
    assert len(kept) == 200


def test_trim_runs_now_and_then_every_period() -> None:
    calls: list[float] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()

        def trim() -> int:
            calls.append(loop.time())
            return 1

        task = asyncio.create_task(trim_memory_forever(0.01, trim))
        while len(calls) < 3:
            await asyncio.sleep(0.005)
        task.cancel()

    asyncio.run(run())
    assert len(calls) >= 3
    assert calls[1] - calls[0] >= 0.009


def test_without_malloc_trim_nothing_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_memory, "malloc_trim", lambda: None)
    asyncio.run(asyncio.wait_for(trim_memory_forever(0.01), 1))  # returns at once instead of looping
