"""Freed memory goes back to the operating system.

glibc's malloc keeps memory that a long-running process frees inside its heaps, and hands it back to the
kernel only when the free space sits at a heap's top. The gateway frees ~55 MiB while it starts (imports,
guard warm-up, model catalogs, the first requests' caches) that then stays resident for good: measured,
519 MiB under load without a trim against 464 MiB with it, both flat over 100,000 requests.
``malloc_trim(0)`` releases every free page of every heap (0.1 to 6 ms here); the gateway calls it every
``TRIM_EVERY_S`` so that what later bursts free goes back too. Elsewhere than glibc (musl, macOS) there is
nothing to call and nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("lamina")

#: seconds between two trims of the gateway's heaps
TRIM_EVERY_S = 30.0


def malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` as a function of no argument (1 when it released memory), or None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))  # ctypes releases the GIL for the call


async def trim_memory_forever(every_s: float = TRIM_EVERY_S, trim: Callable[[], int] | None = None) -> None:
    """Trim the heaps now and every ``every_s`` seconds, in a worker thread (the event loop never waits on
    it); ``trim`` defaults to glibc's ``malloc_trim`` and the loop ends at once where there is none."""
    trim = trim or malloc_trim()
    if trim is None:
        log.debug("no malloc_trim in this C library: freed memory stays with the allocator")
        return
    while True:
        await asyncio.to_thread(trim)
        await asyncio.sleep(every_s)
