"""The state directory and the SQLite metadata store are readable by their owner only, whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.config import LaminaConfig
from lamina.data import DatasetCatalog
from lamina.stack import open_store


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The common default umask 022, under which new files are world-readable unless created otherwise."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("permissive_umask")
def test_state_dir_database_wal_and_locks_are_owner_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = open_store(LaminaConfig(), state)
    try:
        catalog = DatasetCatalog(store)
        catalog.runs.start("docs", "run-1", pid=os.getpid())  # a write: SQLite keeps its WAL and SHM files
        with catalog.lock("docs"):
            locks = state / "locks"
            assert mode(locks) == 0o700
            assert [mode(p) for p in locks.iterdir()] == [0o600]
        database = state / "lamina.db"
        files = {p.name: mode(p) for p in state.iterdir() if p.name.startswith("lamina.db")}
        assert files == {"lamina.db": 0o600, "lamina.db-wal": 0o600, "lamina.db-shm": 0o600}
        assert mode(state) == 0o700 and mode(database) == 0o600
    finally:
        store.close()


@pytest.mark.usefixtures("permissive_umask")
def test_a_store_url_elsewhere_gets_an_owner_only_directory(tmp_path: Path) -> None:
    config = LaminaConfig.model_validate({"store": {"url": f"sqlite:///{tmp_path / 'meta' / 'm.db'}"}})
    store = open_store(config, tmp_path / "state")
    store.close()
    assert mode(tmp_path / "state") == 0o700
    assert mode(tmp_path / "meta") == 0o700 and mode(tmp_path / "meta" / "m.db") == 0o600
