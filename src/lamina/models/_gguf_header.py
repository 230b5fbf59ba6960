"""A bounded reader for the header of a GGUF file: what the file says about itself, checked against its size.

The ``gguf`` package's ``GGUFReader`` trusts the counts a file states. It walks an array that claims
2**62 elements one element at a time, each a numpy view of the memory map; past the end of the file the
views are empty, the offset stops moving and a crafted 60-byte file runs until memory runs out. A string
that claims more bytes than the file holds is silently cut short. On real files it builds a numpy object
per array element (a tokenizer's vocabulary: hundreds of thousands), only for Lamina to read six keys.

This reader checks every count and size against the bytes the file has left before it reads, loops or
allocates: a claim the file cannot hold is a CorruptFileError at once, and no read goes past the end of
the file. It keeps only the keys Lamina uses (:data:`KEPT_KEYS`, the context length and the shape) and
steps over arrays without building their elements. ``gguf`` still supplies the format's constants (value
types, tensor types and their sizes). Nested arrays are refused, as llama.cpp refuses them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import BinaryIO

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from lamina.errors import CorruptFileError

GGUF_MAGIC = b"GGUF"
#: the versions this reader (and llama.cpp) reads; version 1 used 32-bit counts
GGUF_VERSIONS = (2, 3)
#: magic, version, tensor count, key/value count
HEADER_BYTES = 24
#: what GGUF's specification allows a key (and llama.cpp a tensor name) to be
MAX_NAME_BYTES = 65_535
#: ggml's GGML_MAX_DIMS
MAX_DIMS = 4
#: the keys whose values are kept (plus every ``{architecture}.`` key ending in one of ``_KEPT_SUFFIXES``)
KEPT_KEYS = frozenset(
    {
        "general.architecture",
        "general.name",
        "general.file_type",
        "general.alignment",
        "tokenizer.chat_template",
    }
)

#: the model's shape, as far as the KV cache estimate needs it
_KEPT_SUFFIXES = (
    ".context_length",
    ".block_count",
    ".embedding_length",
    ".attention.head_count",
    ".attention.head_count_kv",
    ".attention.key_length",
    ".attention.value_length",
)
#: the least a key/value pair takes: key length, value type, a one-byte value
_MIN_KV_BYTES = 8 + 4 + 1
#: the least a tensor description takes: name length, dimension count, type, offset
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8
_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}

Scalar = int | float | bool | str


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file's header says, every count in it checked against the file's size."""

    version: int
    n_tensors: int
    #: the values of the kept keys that are scalars or strings (arrays are stepped over)
    values: dict[str, Scalar]
    #: elements of all tensors together
    parameter_count: int
    #: where tensor data starts, and where the last tensor ends, in bytes from the start of the file
    data_offset: int
    data_end: int


def corrupt_gguf(label: str, why: str) -> CorruptFileError:
    return CorruptFileError(f"{label} is damaged: it starts like a GGUF file but {why}; download it again")


def gguf_byte_order(head: bytes, label: str) -> str:
    """``"<"`` or ``">"``: the byte order of a GGUF file, from its first 8 bytes; refuses other versions.

    A big-endian file's version reads as a multiple of 65536 in little-endian order, as GGUFReader checks.
    """
    if len(head) < 8:
        raise corrupt_gguf(label, f"its header is cut off after {len(head)} bytes")
    little = struct.unpack_from("<I", head, 4)[0]
    order = "<" if little & 0xFFFF else ">"
    version = struct.unpack_from(f"{order}I", head, 4)[0]
    if version not in GGUF_VERSIONS:
        raise corrupt_gguf(
            label, f"its header names GGUF version {version}, which is not one Lamina reads (2 or 3)"
        )
    return order


class _Cursor:
    """Reads from ``f`` in order, refusing any read that would go past ``size``."""

    def __init__(self, f: BinaryIO, size: int, label: str, order: str) -> None:
        self._f, self._size, self.label, self.order = f, size, label, order
        self.pos = 0

    @property
    def remaining(self) -> int:
        return self._size - self.pos

    def take(self, n: int, what: str) -> bytes:
        self._check(n, what)
        data = self._f.read(n)
        if len(data) != n:
            raise corrupt_gguf(self.label, f"it ended while {what} was read (it shrank while being read?)")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._check(n, what)
        self._f.seek(n, 1)
        self.pos += n

    def unpack(self, fmt: str, what: str) -> tuple[int, ...]:
        fmt = self.order + fmt
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def string(self, what: str, max_bytes: int | None = None) -> int:
        """Read a string's length, checked against what is left (and ``max_bytes``); the caller reads it."""
        (n,) = self.unpack("Q", f"the length of {what}")
        if max_bytes is not None and n > max_bytes:
            raise corrupt_gguf(self.label, f"{what} claims {n:,} bytes, more than the {max_bytes:,} allowed")
        self._check(n, what)
        return n

    def _check(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise corrupt_gguf(
                self.label,
                f"it is truncated or lies about its sizes: {what} needs {n:,} bytes at offset {self.pos:,} "
                f"and the file ends at {self._size:,}",
            )


def read_gguf_header(f: BinaryIO, size: int, label: str) -> GGUFHeader:
    """Parse the header, metadata and tensor descriptions of the GGUF file open as ``f`` (``size`` bytes).

    Reads at most ``size`` bytes, in order, from where ``f`` stands (the start of the file).
    """
    head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise corrupt_gguf(label, "it does not start with the GGUF magic")
    order = gguf_byte_order(head, label)
    cur = _Cursor(f, size, label, order)
    cur.pos = len(head)
    n_tensors, n_kv = cur.unpack("QQ", "the tensor and key/value counts")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > cur.remaining:
        raise corrupt_gguf(
            label,
            f"its header claims {n_kv:,} key/value pairs and {n_tensors:,} tensors, which cannot fit in "
            f"its {size:,} bytes",
        )
    values: dict[str, Scalar] = {}
    for _ in range(n_kv):
        _read_kv(cur, values)
    alignment = _alignment(values.get("general.alignment", GGUF_DEFAULT_ALIGNMENT), label)
    parameters, end = 0, 0
    for _ in range(n_tensors):
        n_elements, tensor_end = _read_tensor_info(cur)
        parameters, end = parameters + n_elements, max(end, tensor_end)
    data_offset = cur.pos + (-cur.pos % alignment)
    if n_tensors and data_offset + end > size:
        raise corrupt_gguf(
            label, f"it is truncated: its tensors need {data_offset + end:,} bytes and the file has {size:,}"
        )
    version = struct.unpack_from(f"{order}I", head, 4)[0]
    return GGUFHeader(version, n_tensors, values, parameters, data_offset, data_offset + end)


def _read_kv(cur: _Cursor, values: dict[str, Scalar]) -> None:
    n = cur.string("a metadata key", MAX_NAME_BYTES)
    key = _decode(cur, cur.take(n, "a metadata key"), "a metadata key")
    kept = key in KEPT_KEYS or key.endswith(_KEPT_SUFFIXES)
    if kept and key in values:
        raise corrupt_gguf(cur.label, f"its metadata key {key!r} appears twice")
    vtype = _value_type(cur, f"the value of {key!r}")
    if vtype == GGUFValueType.ARRAY:
        _skip_array(cur, key)
    elif vtype == GGUFValueType.STRING:
        n = cur.string(f"the value of {key!r}")
        if kept:
            values[key] = _decode(cur, cur.take(n, f"the value of {key!r}"), f"the value of {key!r}")
        else:
            cur.skip(n, f"the value of {key!r}")
    else:
        (value,) = cur.unpack(_SCALARS[vtype], f"the value of {key!r}")
        if kept:
            values[key] = value


def _skip_array(cur: _Cursor, key: str) -> None:
    """Step over an array's elements, after checking that the file can hold as many as it claims."""
    element = _value_type(cur, f"the element type of {key!r}")
    (count,) = cur.unpack("Q", f"the length of {key!r}")
    if element == GGUFValueType.ARRAY:
        raise corrupt_gguf(cur.label, f"its metadata {key!r} is an array of arrays, which llama.cpp refuses")
    each = 8 if element == GGUFValueType.STRING else struct.calcsize(_SCALARS[element])
    if count * each > cur.remaining:
        raise corrupt_gguf(
            cur.label,
            f"its metadata array {key!r} claims {count:,} elements of at least {each} bytes, more than "
            f"the {cur.remaining:,} bytes left in the file",
        )
    if element != GGUFValueType.STRING:
        cur.skip(count * each, f"the elements of {key!r}")
        return
    for _ in range(count):
        cur.skip(cur.string(f"an element of {key!r}"), f"an element of {key!r}")


def _read_tensor_info(cur: _Cursor) -> tuple[int, int]:
    """One tensor's description: its element count, and where its data ends (from the data section)."""
    n = cur.string("a tensor name", MAX_NAME_BYTES)
    name = cur.take(n, "a tensor name").decode("utf-8", errors="replace")
    (n_dims,) = cur.unpack("I", f"the dimension count of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise corrupt_gguf(
            cur.label, f"its tensor {name!r} claims {n_dims:,} dimensions (at most {MAX_DIMS})"
        )
    dims = cur.unpack("Q" * n_dims, f"the dimensions of tensor {name!r}")
    raw_type, offset = cur.unpack("IQ", f"the type and offset of tensor {name!r}")
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
    except (ValueError, KeyError):
        raise corrupt_gguf(
            cur.label, f"its tensor {name!r} has type {raw_type}, which no ggml version defines"
        ) from None
    n_elements = math.prod(dims)
    return n_elements, offset + n_elements * type_size // block


def _value_type(cur: _Cursor, what: str) -> GGUFValueType:
    (raw,) = cur.unpack("I", what)
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise corrupt_gguf(cur.label, f"{what} has type {raw}, which GGUF does not define") from None


def _decode(cur: _Cursor, data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise corrupt_gguf(cur.label, f"{what} is not UTF-8 text") from None


def _alignment(value: Scalar, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise corrupt_gguf(label, f"its general.alignment is {value!r}, not a power of two")
    return value
