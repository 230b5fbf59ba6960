"""The bounded GGUF header reader: crafted files whose counts lie are refused at once, without reading past
the end of the file or allocating what they claim; real files read as the gguf package reads them."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from lamina.errors import CorruptFileError
from lamina.models._formats import detect_format, read_metadata
from lamina.models._gguf_header import read_gguf_header
from tests.support import MakeGGUF

STRING, ARRAY, UINT32, UINT8 = 8, 9, 4, 0


class CountingReader(io.BytesIO):
    """A file that counts the bytes asked of it and the furthest position reached."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0
        self.furthest = 0

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        self.furthest = max(self.furthest, self.tell())
        return data

    def seek(self, offset: int, whence: int = 0, /) -> int:
        pos = super().seek(offset, whence)
        self.furthest = max(self.furthest, pos)
        return pos


def _header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _array_kv(key: str, element: int, count: int) -> bytes:
    """A key whose value is an array of ``count`` elements of type ``element`` (the elements not included)."""
    return _string(key) + struct.pack("<IIQ", ARRAY, element, count)


def _tensor(name: str, dims: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


#: name -> (file bytes, what the error says)
CRAFTED: dict[str, tuple[bytes, str]] = {
    "huge array length": (
        _header(0, 1) + _array_kv("tokenizer.ggml.scores", UINT8, 2**62) + bytes(16),
        "claims 4,611,686,018,427,387,904 elements",
    ),
    "huge string array": (
        _header(0, 1) + _array_kv("tokenizer.ggml.tokens", STRING, 2**40) + bytes(16),
        "claims 1,099,511,627,776 elements",
    ),
    "huge string length": (
        _header(0, 1) + _string("general.name") + struct.pack("<IQ", STRING, 2**40) + b"tiny",
        "needs 1,099,511,627,776 bytes",
    ),
    "huge key length": (_header(0, 1) + struct.pack("<Q", 2**40) + bytes(20), "more than the 65,535 allowed"),
    "huge n_kv": (_header(0, 2**60) + bytes(16), "1,152,921,504,606,846,976 key/value pairs"),
    "huge n_tensors": (_header(2**62, 0) + bytes(32), "4,611,686,018,427,387,904 tensors"),
    "wrong version": (_header(0, 0, version=7) + bytes(32), "GGUF version 7"),
    "version 1": (_header(0, 0, version=1) + bytes(32), "GGUF version 1"),
    "truncated header": (_header(0, 1)[:20], "the tensor and key/value counts needs 16 bytes"),
    "truncated value": (
        _header(0, 1) + _string("general.file_type") + struct.pack("<IB", UINT32, 1),
        "needs 4",
    ),
    "nested arrays": (
        _header(0, 1) + _array_kv("a", ARRAY, 1) + struct.pack("<IQ", UINT8, 1) + b"x",
        "array of arrays",
    ),
    "unknown value type": (_header(0, 1) + _string("a") + struct.pack("<I", 99) + bytes(8), "has type 99"),
    "too many dimensions": (_header(1, 0) + _tensor("w", (1,) * 5), "claims 5 dimensions"),
    "unknown tensor type": (_header(1, 0) + _tensor("w", (4,), ggml_type=999), "has type 999"),
    "tensor past the end": (_header(1, 0) + _tensor("w", (1 << 30,)), "its tensors need"),
    "duplicate kept key": (
        _header(0, 2) + (_string("general.name") + struct.pack("<I", STRING) + _string("x")) * 2,
        "appears twice",
    ),
    "bad alignment": (
        _header(0, 1) + _string("general.alignment") + struct.pack("<II", UINT32, 24),
        "not a power of two",
    ),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_headers_are_refused_within_the_file(case: str) -> None:
    data, says = CRAFTED[case]
    f = CountingReader(data)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CorruptFileError) as err:
            read_gguf_header(f, len(data), "crafted.gguf")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0  # generous: each is refused in well under a millisecond
    assert says in err.value.message
    assert "crafted.gguf is damaged" in err.value.message and "\n" not in err.value.message
    assert f.bytes_read <= len(data) and f.furthest <= len(data)
    assert peak < 256 * 1024  # nothing the size of what the file claims was allocated


@pytest.mark.parametrize("case", ["huge array length", "huge string length", "huge n_kv", "wrong version"])
def test_read_metadata_refuses_crafted_files(tmp_path: Path, case: str) -> None:
    path = tmp_path / "crafted.gguf"
    path.write_bytes(CRAFTED[case][0])
    with pytest.raises(CorruptFileError, match="damaged"):
        read_metadata(path, detect_format(path))


def test_every_prefix_of_a_real_file_is_refused_cleanly(make_gguf: MakeGGUF) -> None:
    data = make_gguf().read_bytes()
    end = read_gguf_header(io.BytesIO(data), len(data), "whole.gguf").data_end
    assert len(data) - 32 < end <= len(data)  # what follows the last tensor is padding at most
    for keep in range(end):
        f = CountingReader(data[:keep])
        with pytest.raises(CorruptFileError):
            read_gguf_header(f, keep, "cut.gguf")
        assert f.furthest <= keep


def _writer_file(path: Path, add: Callable[[gguf.GGUFWriter], None]) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    add(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_real_file_reads_as_the_gguf_package_reads_it(tmp_path: Path) -> None:
    def add(w: gguf.GGUFWriter) -> None:
        w.add_name("vocab-model")
        w.add_context_length(4096)
        w.add_token_list(["<s>", "</s>", "héllo", ""])
        w.add_token_scores([0.0, -1.0, -2.5, 3.0])
        w.add_chat_template("{{ messages }}")
        w.add_custom_alignment(64)
        w.add_tensor("a", np.zeros((3, 5), dtype=np.float32))
        w.add_tensor("b", np.zeros((7,), dtype=np.float16))

    path = _writer_file(tmp_path / "vocab.gguf", add)
    data = path.read_bytes()
    f = CountingReader(data)
    header = read_gguf_header(f, len(data), "vocab.gguf")
    reference = gguf.GGUFReader(path)
    assert header.version == 3 and header.n_tensors == 2
    assert header.values["general.name"] == "vocab-model"
    assert header.values["llama.context_length"] == 4096
    assert header.values["general.alignment"] == 64
    assert header.values["tokenizer.chat_template"] == "{{ messages }}"
    assert "tokenizer.ggml.tokens" not in header.values  # arrays are stepped over, not kept
    assert header.parameter_count == 15 + 7
    assert header.data_offset == reference.data_offset
    assert header.data_end == max(int(t.data_offset) + int(t.n_bytes) for t in reference.tensors)
    assert f.furthest <= header.data_offset  # tensor data is never read


def test_a_big_endian_file_reads(tmp_path: Path) -> None:
    def add(w: gguf.GGUFWriter) -> None:
        w.add_name("be")
        w.add_tensor("a", np.zeros((4,), dtype=np.float32))

    writer = gguf.GGUFWriter(str(tmp_path / "be.gguf"), "llama", endianess=gguf.GGUFEndian.BIG)
    add(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = read_metadata(tmp_path / "be.gguf", "gguf")
    assert (meta["name"], meta["parameter_count"], meta["architecture"]) == ("be", 4, "llama")
