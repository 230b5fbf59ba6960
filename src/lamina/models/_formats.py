"""What a model file is, decided by its bytes, and what it says about itself.

Lamina loads two formats: GGUF (llama.cpp) and ONNX (ONNX Runtime). Neither executes code when loaded.
Formats that load by unpickling (PyTorch checkpoints, joblib, raw pickles) are refused outright, because
unpickling a file can execute arbitrary code; the refusal says how to convert them. Detection trusts
content over names: a real GGUF or ONNX file is accepted whatever it is called, and anything else is
refused as unsafe if either its bytes or its extension say pickle.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import gguf
import onnx
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]  # onnx's parse error

from lamina.errors import (
    RegistryError,
    SourceNotFoundError,
    UnknownFormatError,
    UnsafeFormatError,
)
from lamina.models._gguf_header import GGUF_MAGIC, HEADER_BYTES, gguf_byte_order, read_gguf_header

ModelFormat = Literal["gguf", "onnx"]

SUPPORTED_FORMATS = "GGUF (llama.cpp) and ONNX (ONNX Runtime)"
CONVERT_HINT = (
    "convert it to GGUF with llama.cpp's convert_hf_to_gguf.py or to ONNX with `optimum-cli export onnx`, "
    "then add that file"
)
#: Extensions of formats whose loaders unpickle.
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib"})

_ONNX_FIRST_BYTE = 0x08  # protobuf field 1 (ModelProto.ir_version), varint
_PICKLE_PROTO = 0x80
_HEAD_BYTES = HEADER_BYTES


def detect_format(path: Path, *, label: str | None = None) -> ModelFormat:
    """The format of ``path`` by its content; raises a RegistryError saying why it cannot be added.

    ``label`` names the file in messages (the source the user gave) when ``path`` is a temporary copy.
    """
    label = label or str(path)
    head = _read_head(path, label)
    if head.startswith(GGUF_MAGIC):
        gguf_byte_order(head, label)  # a cheap check of the version; read_metadata parses the rest
        return "gguf"
    onnx_problem = None
    if head[:1] == bytes([_ONNX_FIRST_BYTE]):
        onnx_problem = _onnx_problem(path)
        if onnx_problem is None:
            return "onnx"
    unsafe = _pickle_evidence(path, head)
    if unsafe:
        raise UnsafeFormatError(
            f"{label} is refused: {unsafe}, and loading it means unpickling it, which can execute "
            f"arbitrary code; {CONVERT_HINT}"
        )
    if onnx_problem is not None:
        raise UnknownFormatError(
            f"{label} starts like an ONNX model but does not parse as one ({onnx_problem}); if it is an "
            "ONNX model it is damaged or truncated: download it again"
        )
    what = "is empty" if not head else "is neither GGUF nor ONNX"
    raise UnknownFormatError(f"{label} {what}; supported formats are {SUPPORTED_FORMATS}: {CONVERT_HINT}")


def read_metadata(path: Path, fmt: ModelFormat, *, label: str | None = None) -> dict[str, Any]:
    """What the file says about itself, as JSON-serialisable values (None where the file is silent)."""
    label = label or str(path)
    return _gguf_metadata(path, label) if fmt == "gguf" else _onnx_metadata(path, label)


def takes_text(meta: dict[str, Any]) -> bool:
    """Whether an ONNX model's metadata shows a text model (it takes token ids, so needs a tokenizer)."""
    return any(i.get("name") == "input_ids" for i in meta.get("inputs") or [])


def check_tokenizer_json(path: Path, *, label: str | None = None) -> None:
    """RegistryError unless ``path`` is a Hugging Face tokenizers file (JSON with a ``model`` key)."""
    label = label or str(path)
    try:
        doc = json.loads(path.read_bytes())
    except ValueError as exc:  # UnicodeDecodeError included
        raise RegistryError(f"{label} is not a tokenizer.json: it is not JSON ({exc})") from exc
    if not isinstance(doc, dict) or "model" not in doc:
        raise RegistryError(
            f"{label} is not a tokenizer.json (a Hugging Face tokenizers file has a `model` key); pass "
            "the tokenizer.json from the model's repository"
        )


def _read_head(path: Path, label: str) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(_HEAD_BYTES)
    except FileNotFoundError:
        raise SourceNotFoundError(f"{label}: no such file; check the path") from None
    except OSError as exc:
        raise SourceNotFoundError(f"{label}: cannot be read ({exc.strerror}); check its permissions") from exc


def _onnx_problem(path: Path) -> str | None:
    """None when ``path`` parses as an ONNX model with a graph; else what is wrong."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        return str(exc)
    if model.ir_version <= 0 or not model.graph.node:
        return "it holds no graph"
    return None


def _pickle_evidence(path: Path, head: bytes) -> str | None:
    """Why ``path`` looks like a pickle-based format, or None."""
    if len(head) >= 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5:
        return f"it is a Python pickle (protocol {head[1]})"
    if zipfile.is_zipfile(path):
        pickled = _pickled_members(path)
        if pickled:
            return f"it is a zip holding pickled data ({pickled}), as torch.save writes"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"its extension {path.suffix} is that of a format saved by pickling"
    return None


def _pickled_members(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        return None
    found = [n for n in names if PurePosixPath(n).suffix.lower() in {".pkl", ".pickle"}]
    return found[0] if found else None


def _gguf_metadata(path: Path, label: str) -> dict[str, Any]:
    with path.open("rb") as f:
        header = read_gguf_header(f, os.fstat(f.fileno()).st_size, label)
    values = header.values
    arch = values.get("general.architecture")
    file_type = values.get("general.file_type")
    return {
        "architecture": arch,
        "name": values.get("general.name"),
        "parameter_count": header.parameter_count,
        "quantization": _file_type_name(file_type) if isinstance(file_type, int) else None,
        "context_length": values.get(f"{arch}.context_length") if arch else None,
        "chat_template": values.get("tokenizer.chat_template"),
        "gguf_version": header.version,
    }


def _file_type_name(value: int) -> str:
    try:
        return str(gguf.LlamaFileType(value).name)
    except ValueError:
        return f"FILE_TYPE_{value}"


def _onnx_metadata(path: Path, label: str) -> dict[str, Any]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise UnknownFormatError(f"{label} does not parse as ONNX ({exc}); download it again") from exc
    graph = model.graph
    weights = {init.name for init in graph.initializer}  # old exporters list weights as inputs too
    inputs = [_value_info(v) for v in graph.input if v.name not in weights]
    outputs = [_value_info(v) for v in graph.output]
    first_shape = outputs[0]["shape"] if outputs else []
    last_dim = first_shape[-1] if first_shape else None
    return {
        "inputs": inputs,
        "outputs": outputs,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": model.ir_version,
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p) or None,
        "output_dim": last_dim if isinstance(last_dim, int) else None,
    }


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    """Name, element type and shape (symbolic dims as their names, unknown ones as None)."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": value.name, "type": kind, "shape": None}
    tensor = value.type.tensor_type
    shape: list[int | str | None] | None = None
    if tensor.HasField("shape"):
        shape = [_dim(d) for d in tensor.shape.dim]
    return {"name": value.name, "type": onnx.TensorProto.DataType.Name(tensor.elem_type), "shape": shape}


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    which = dim.WhichOneof("value")
    if which == "dim_value":
        return int(dim.dim_value)
    if which == "dim_param":
        return str(dim.dim_param)
    return None
