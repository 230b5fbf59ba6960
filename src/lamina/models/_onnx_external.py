"""ONNX models whose tensors live in side files ("external data"), stored content-addressed with them.

An ONNX model over protobuf's 2 GB limit keeps its weights in side files, named by each tensor's
``location`` relative to the model's directory, where ONNX Runtime looks for them. The registry stores
every file as ``sha256/<hex>``, so those names would not survive. Instead each side file is stored under
its own sha256, and the model is rewritten so that each location *is* that sha256: beside the stored model,
ONNX Runtime finds exactly the bytes that were registered, and the model's own sha256 covers the names,
hence the contents, of its side files. The version's sha256 is therefore that of the rewritten model, not
of the file given. The side files are companions with the role ``external-data:<location>``, checked at
load like every companion.

Rejected alternative: a directory per version holding links named as the original locations. It needs
links (or copies) that content addressing otherwise avoids, and a garbage collection of its own.

A location that leaves the model's directory (an absolute path, ``..``) is refused: registering such a
model would copy an arbitrary file of this machine into the registry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx

from lamina.errors import CorruptFileError, SourceNotFoundError, UnsafeFormatError
from lamina.models._blobs import Blob
from lamina.models._sources import Fetched, sibling_source

#: the role of a side file among a version's companions: ``external-data:weights.bin``
EXTERNAL_DATA_ROLE = "external-data:"
INLINE_HINT = (
    "or save the model with its weights inside: onnx.save_model(model, path, save_as_external_data=False) "
    "(models under 2 GB)"
)


@dataclass(frozen=True)
class SideFile:
    """A file the model's tensors read from, and how far into it they read."""

    location: str
    #: the first tensor that names it (for messages)
    tensor: str
    end: int


def side_files(model: onnx.ModelProto, label: str) -> list[SideFile]:
    """The side files ``model`` names, by location; UnsafeFormatError for one outside its directory."""
    found: dict[str, SideFile] = {}
    for tensor in _external_tensors(model):
        entries = {e.key: e.value for e in tensor.external_data}
        location = _checked_location(entries.get("location", ""), tensor.name, label)
        try:
            offset, length = (int(entries.get(key) or 0) for key in ("offset", "length"))
        except ValueError:
            raise CorruptFileError(
                f"{label}: tensor {tensor.name!r} has an external-data offset or length that is not a "
                f"number ({entries.get('offset')!r}, {entries.get('length')!r}); export the model again"
            ) from None
        seen = found.get(location, SideFile(location, tensor.name, 0))
        found[location] = replace(seen, end=max(seen.end, offset + length))
    return sorted(found.values(), key=lambda f: f.location)


def with_external_data(
    stack: ExitStack, source: str, fetched: Fetched, open_source: Callable[[str], Fetched], scratch_dir: Path
) -> tuple[Fetched, dict[str, Blob]]:
    """The model file to store and its side files as blobs by role.

    A model without external data comes back as it is. Otherwise each side file is opened beside
    ``source`` with ``open_source`` and hashed, and the model comes back rewritten to name them by sha256:
    a temporary file in ``scratch_dir`` that ``stack`` removes unless the registry moved it into place.
    """
    model = onnx.load(str(fetched.path), load_external_data=False)
    found = side_files(model, fetched.source)
    if not found:
        return fetched, {}
    blobs = {f.location: _open_side_file(f, source, fetched.source, open_source) for f in found}
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = blobs[_checked_location(entry.value, tensor.name, fetched.source)].sha256
    rewritten = stack.enter_context(_temporary(model.SerializeToString(), fetched, scratch_dir))
    return rewritten, {EXTERNAL_DATA_ROLE + loc: blob for loc, blob in blobs.items()}


def _open_side_file(side: SideFile, source: str, label: str, open_source: Callable[[str], Fetched]) -> Blob:
    where = sibling_source(source, side.location)
    try:
        blob = Blob.of(open_source(where))
    except SourceNotFoundError as exc:
        raise SourceNotFoundError(
            f"{label} keeps the data of tensor {side.tensor!r} in the side file {side.location!r}, which is "
            f"not beside it ({exc.message}); add the model from the directory that holds both, "
            f"{INLINE_HINT}"
        ) from exc
    if blob.size_bytes < side.end:
        raise CorruptFileError(
            f"{label}: its side file {side.location!r} has {blob.size_bytes:,} bytes but its tensors read "
            f"up to byte {side.end:,}; it is truncated or belongs to another model: copy it again"
        )
    return blob


def _checked_location(location: str, tensor: str, label: str) -> str:
    """``location`` as a relative POSIX path inside the model's directory, or UnsafeFormatError."""
    windows = PureWindowsPath(location)  # splits on both separators and sees drives
    if not location or windows.drive or windows.root or ".." in windows.parts or "\0" in location:
        raise UnsafeFormatError(
            f"{label} is refused: tensor {tensor!r} keeps its data at {location!r}, outside the model's "
            "directory, and a model may only name side files beside it; move the file next to the model "
            f"and name it by a relative path, {INLINE_HINT}"
        )
    return str(PurePosixPath(*windows.parts))


@contextmanager
def _temporary(data: bytes, fetched: Fetched, scratch_dir: Path) -> Iterator[Fetched]:
    scratch_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=scratch_dir, prefix=".rewrite-", suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        digest = hashlib.sha256(data).hexdigest()
        yield replace(fetched, path=Path(name), sha256=digest, temporary=True)
    finally:
        Path(name).unlink(missing_ok=True)


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    return (t for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL)


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model that may hold data: initializers and attribute values, in every graph."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
        for sparse in attr.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)
