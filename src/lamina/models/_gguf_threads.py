"""A persistent ggml thread pool for a llama.cpp context, as llama.cpp's own server attaches one.

Without it, ggml starts and joins its worker threads on every ``llama_decode``; with it the threads stay
and spin briefly between steps. Measured here with SmolLM2 on 2 cores: 8 sequences decode at 181 tokens/s
with a pool against 143 without, one sequence at 109 against 96. llama-cpp-python does not bind the pool
functions, so they are bound here from the libraries it ships; where they cannot be found the context runs
without a pool, as before.

A pool may pin its threads, one to each CPU it is given (ggml's ``strict_cpu``): the thread that calls
``llama_decode`` to the first, the others to the rest. Unpinned, the kernel often puts both of a 2-core
replica's threads on one core while another process runs on the other (the gateway, a batch job, a
compiler), and every barrier between them then waits a time slice: 8 streams through the stack fell from
about 170 to 6 tokens/s beside two busy loops, niced or SCHED_IDLE, on 3 December (47-53 pinned), and
quiet they decoded 158-165 unpinned against 175-177 pinned.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import llama_cpp

log = logging.getLogger("lamina.models.gguf")

#: ggml's GGML_MAX_N_THREADS: the length of the pool's CPU mask
_MAX_THREADS = 512


class _PoolParams(ctypes.Structure):
    """ggml's ``struct ggml_threadpool_params``."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * _MAX_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


class _Library:
    def __init__(self, folder: Path) -> None:
        base = ctypes.CDLL(str(folder / "libggml-base.so"))
        cpu = ctypes.CDLL(str(folder / "libggml-cpu.so"))
        llama = ctypes.CDLL(str(folder / "libllama.so"))
        self.init = base.ggml_threadpool_params_init
        self.init.argtypes, self.init.restype = [ctypes.POINTER(_PoolParams), ctypes.c_int], None
        self.new = cpu.ggml_threadpool_new
        self.new.argtypes, self.new.restype = [ctypes.POINTER(_PoolParams)], ctypes.c_void_p
        self.free = cpu.ggml_threadpool_free
        self.free.argtypes, self.free.restype = [ctypes.c_void_p], None
        self.attach = llama.llama_attach_threadpool
        self.attach.argtypes, self.attach.restype = [ctypes.c_void_p] * 3, None


def _library() -> _Library | None:
    try:
        return _Library(Path(llama_cpp.__file__).parent / "lib")
    except (OSError, AttributeError) as exc:
        log.info("llama.cpp thread pools unavailable (%s); decoding without one", exc)
        return None


class ThreadPools:
    """The pools attached to one context; free them after the context (``close``)."""

    def __init__(self, ctx: Any, threads: int, threads_batch: int, cpus: list[int] | None = None) -> None:
        """``cpus``: pin the threads to these CPUs, one each, in order (None: unpinned)."""
        self._lib = _library()
        self._pools: list[int] = []
        self._cpus = cpus
        if self._lib is None:
            return
        batch = None
        if threads_batch != threads:
            batch = self._new(threads_batch, paused=False)
        pool = self._new(threads, paused=batch is not None)
        if pool is not None:
            self._lib.attach(ctx, pool, batch)

    @property
    def attached(self) -> bool:
        return bool(self._pools)

    @property
    def pinned(self) -> list[int]:
        """The CPUs the threads are pinned to (empty: not pinned)."""
        return list(self._cpus or ()) if self._pools else []

    def _new(self, threads: int, *, paused: bool) -> int | None:
        assert self._lib is not None
        params = _PoolParams()
        self._lib.init(ctypes.byref(params), threads)
        params.paused = paused
        if self._cpus:
            for cpu in self._cpus:
                params.cpumask[cpu] = True
            params.strict_cpu = True
        pool = self._lib.new(ctypes.byref(params))
        if pool:
            self._pools.append(pool)
        return pool or None

    def close(self) -> None:
        if self._lib is not None:
            for pool in self._pools:
                self._lib.free(pool)
        self._pools.clear()
