"""The GGUF engine pins llama.cpp's threads, one to each physical core, when they are as many as the cores
it may use (``gguf.pin_threads``), and a caller's thread that decodes in process gets its CPU mask back."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from lamina.compute import core_cpus
from lamina.models import _gguf
from lamina.models._engine import LoadSpec, SamplingParams
from lamina.models._gguf import GGUFEngine, pinned_cpus
from tests.support import smollm2_path

ALL_CPUS = set(range(os.cpu_count() or 1))
CORES = core_cpus(ALL_CPUS)


def _affinities() -> dict[int, set[int]]:
    """Every thread of this process: its id and CPU mask."""
    masks = {}
    for task in Path("/proc/self/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                masks[int(task.name)] = _cpu_list(line.split(":", 1)[1].strip())
    return masks


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _decoded(*, pin: bool) -> tuple[str, list[set[int]]]:
    """In a thread free to use every CPU (the test worker's own mask is one CPU, see conftest): an engine
    with two threads decodes a few tokens in process; its ``pinned_cpus`` and the masks of the threads it
    made. The thread's own mask must be whole after the engine's warm-up and after the answer."""
    found: list[tuple[str, list[set[int]]]] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            os.sched_setaffinity(0, ALL_CPUS)
            before = set(_affinities())
            options = {"n_ctx": 256, "n_threads": 2, "pin_threads": pin}
            engine = GGUFEngine(LoadSpec(name="smol", path=smollm2_path(), options=options))
            try:
                assert os.sched_getaffinity(0) == ALL_CPUS  # its warm-up decoded here too
                assert "".join(
                    d.text for d in engine.complete("Once upon a time", SamplingParams(max_tokens=4))
                )
                assert os.sched_getaffinity(0) == ALL_CPUS  # decoded in process: its own mask is back
                made = [mask for tid, mask in _affinities().items() if tid not in before]
                found.append((engine.info().details["pinned_cpus"], made))
            finally:
                engine.close()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return found[0]


def test_pinning_is_decided_by_the_threads_and_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(_gguf, "core_cpus", lambda cpus: sorted(cpus))
    assert pinned_cpus(None, 4) == [0, 1, 2, 3]  # as many threads as cores: the replica has them
    assert pinned_cpus(None, 2) is None  # fewer: another replica may share the cores
    assert pinned_cpus(True, 2) == [0, 1]
    assert pinned_cpus(False, 4) is None
    assert pinned_cpus(True, 8) is None  # more threads than cores cannot be pinned one to a core
    assert pinned_cpus(None, 1) is None  # llama.cpp runs one thread unpinned whatever the mask


@pytest.mark.skipif(len(CORES) < 2, reason="pinning two threads needs two physical cores")
def test_threads_are_pinned_to_distinct_cores_and_the_callers_mask_comes_back() -> None:
    pinned, made = _decoded(pin=True)
    assert pinned == f"{CORES[0]},{CORES[1]}"
    # llama.cpp's worker thread (made for this caller's decodes) sits on the second core alone
    assert {CORES[1]} in made


def test_unpinned_threads_keep_the_mask_they_have() -> None:
    pinned, made = _decoded(pin=False)
    assert pinned == "none"
    assert made and all(mask == ALL_CPUS for mask in made)
