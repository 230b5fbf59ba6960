"""The dataset lock between real processes, on SQLite (flock) and PostgreSQL (advisory lock): a holder
excludes every other process, and the lock is free again when the holder finishes or is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from lamina.data import DatasetCatalog
from lamina.errors import ConflictError
from lamina.store import Store

BUSY = "another ingest or gc of dataset 'docs' is running"
#: holds dataset docs's lock until its stdin closes; says "held" when it has it and "released" after
HOLDER = """
import sys
from lamina.data import DatasetCatalog
from lamina.store import Store

with DatasetCatalog(Store(sys.argv[1])).lock("docs"):
    print("held", flush=True)
    sys.stdin.read()
print("released", flush=True)
"""


@pytest.fixture
def holder(store: Store) -> Iterator[subprocess.Popen[str]]:
    """Another process holding dataset docs's lock in ``store``."""
    command = [sys.executable, "-c", HOLDER, store.url]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "held\n"
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def try_lock(catalog: DatasetCatalog) -> None:
    with catalog.lock("docs"):
        pass


@pytest.mark.timeout(120)
def test_a_process_holding_the_lock_excludes_others_until_it_finishes(
    store: Store, holder: subprocess.Popen[str]
) -> None:
    catalog = DatasetCatalog(store)
    with pytest.raises(ConflictError, match=BUSY):
        try_lock(catalog)
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.close()
    assert holder.stdout.readline() == "released\n"
    try_lock(catalog)  # at once: it was released, not left to expire


@pytest.mark.timeout(120)
def test_a_killed_holder_leaves_the_lock_free(store: Store, holder: subprocess.Popen[str]) -> None:
    catalog = DatasetCatalog(store)
    with pytest.raises(ConflictError, match=BUSY):
        try_lock(catalog)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    # the kernel drops a flock with the process; PostgreSQL ends the session when it sees the socket close,
    # a moment later: poll the real server for that, with a deadline
    deadline = time.monotonic() + 30
    while True:
        try:
            try_lock(catalog)
            break
        except ConflictError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
