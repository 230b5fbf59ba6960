"""What every backend shares to write and rank rows: validated chunks, filter tags, top-k with ties."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from lamina.data.vectors._text import EnglishAnalyzer, IndexedText
from lamina.data.vectors._types import SOURCE_URI_KEY, Chunk, Scalar
from lamina.errors import InvalidRequestError


def tag(key: str, value: Scalar) -> str:
    """The filterable form of one metadata entry: JSON ``[key, value]``, integral floats as ints."""
    if "\x00" in key or (isinstance(value, str) and "\x00" in value):
        raise InvalidRequestError(
            f"metadata/filter entry {key!r} holds a NUL character, which stores cannot keep; remove it",
            param="metadata",
        )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, str | int | float) or (isinstance(value, float) and not math.isfinite(value)):
        raise InvalidRequestError(
            f"metadata/filter value for {key!r} must be a string, integer, finite float or boolean, "
            f"got {value!r}",
            param="metadata",
        )
    return json.dumps([key, value], ensure_ascii=False, separators=(",", ":"))


def check_metadata(metadata: Mapping[str, Scalar]) -> None:
    """Raise ``InvalidRequestError`` for the first entry a store cannot hold, naming it.

    A reserved key, a value that is not a string, integer, finite float or boolean, or a NUL character
    (PostgreSQL text cannot hold one) in a key or a value.
    """
    for key, value in metadata.items():
        if key == SOURCE_URI_KEY:
            raise InvalidRequestError(
                f"metadata key {SOURCE_URI_KEY!r} is reserved (it holds each chunk's source); rename it",
                param="metadata",
            )
        tag(key, value)


def filter_tags(filters: Mapping[str, Scalar] | None) -> list[str]:
    return sorted(tag(key, value) for key, value in (filters or {}).items())


@dataclass(frozen=True, slots=True)
class PreparedChunk:
    """A validated chunk with everything a backend writes besides its fields."""

    chunk: Chunk
    vector: npt.NDArray[np.float32]
    indexed: IndexedText
    tags: list[str]
    metadata_json: str


def prepare_chunks(dataset: str, chunks: Sequence[Chunk], analyzer: EnglishAnalyzer) -> list[PreparedChunk]:
    """Validate chunks for ``dataset`` and index their text; a repeated chunk id keeps its last copy."""
    latest = {chunk.chunk_id: chunk for chunk in chunks}
    prepared = [_prepare(dataset, chunk, analyzer) for chunk in latest.values()]
    dims = {p.vector.shape[0] for p in prepared}
    if len(dims) > 1:
        raise InvalidRequestError(f"chunks for {dataset!r} have vectors of different lengths {sorted(dims)}")
    return prepared


def _prepare(dataset: str, chunk: Chunk, analyzer: EnglishAnalyzer) -> PreparedChunk:
    where = f"chunk {chunk.chunk_id!r}"
    if chunk.dataset != dataset:
        raise InvalidRequestError(f"{where} belongs to dataset {chunk.dataset!r}, not {dataset!r}")
    if not chunk.chunk_id:
        raise InvalidRequestError("a chunk has an empty chunk_id; derive it from the chunk's content")
    if chunk.vector is None or len(chunk.vector) == 0:
        raise InvalidRequestError(f"{where} has no vector; embed it before writing it to the store")
    vector = np.asarray(chunk.vector, dtype=np.float32)
    if not np.all(np.isfinite(vector)):
        raise InvalidRequestError(f"{where} has a vector with NaN or infinite values; check the embedder")
    try:
        check_metadata(chunk.metadata)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{where}: {exc.message}", param="metadata") from None
    tags = [tag(key, value) for key, value in chunk.metadata.items()]
    tags.append(tag(SOURCE_URI_KEY, chunk.source_uri))
    return PreparedChunk(
        chunk=chunk,
        vector=vector,
        indexed=analyzer.index(chunk.text),
        tags=sorted(tags),
        metadata_json=json.dumps(chunk.metadata, ensure_ascii=False, sort_keys=True),
    )


def check_dim(dataset: str, expected: int, got: int) -> None:
    if expected != got:
        raise InvalidRequestError(
            f"dataset {dataset!r} holds {expected}-d vectors, got {got}-d; embed with the dataset's model "
            "or ingest into a new dataset",
        )


def top_with_ties(scores: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.intp]:
    """Indices of the ``k`` best scores and of every score tied with the k-th, in no order.

    The caller breaks the ties (by chunk id), so the result does not depend on the input order.
    """
    if k <= 0 or len(scores) == 0:
        return np.empty(0, dtype=np.intp)
    if len(scores) <= k:
        return np.arange(len(scores))
    threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
    return np.flatnonzero(scores >= threshold)


@dataclass(frozen=True, slots=True)
class Scored:
    """A backend's ranked result before it becomes a Hit."""

    chunk: Chunk
    score: float


@dataclass(frozen=True, slots=True)
class Ranking:
    """One ranked retrieval a backend answers: the best ``k`` chunks of ``dataset`` inside ``scope`` (None:
    all of them) whose tags hold every one of ``tags``."""

    dataset: str
    k: int
    tags: list[str]
    scope: frozenset[str] | None
