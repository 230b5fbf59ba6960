"""Chunking in the embedder's own tokens: sizes, overlap, word borders, spans (real MiniLM tokenizer)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from lamina.data.ingest import chunk_spans, windows
from lamina.errors import InvalidRequestError
from lamina.models._embedder import EngineEmbedder
from lamina.models._registry import ModelVersion


@pytest.fixture(scope="module")
def embedder(bundled: dict[str, ModelVersion]) -> Iterator[EngineEmbedder]:
    e = EngineEmbedder(bundled["minilm-l6-v2"])
    yield e
    e.close()


TEXT = " ".join(
    f"Sentence {i} talks about tokenization, embeddings and unbelievably long words like "
    f"antidisestablishmentarianism{i}."
    for i in range(40)
)


def test_chunks_fit_the_window_in_the_models_tokens(embedder: EngineEmbedder) -> None:
    spans = chunk_spans([TEXT], embedder, 50, 10)[0]
    assert len(spans) > 5
    for span in spans:
        piece = TEXT[span.start : span.end]
        assert embedder.count_tokens(piece) - 2 == span.tokens <= 50  # re-tokenised: the same tokens
        assert span.start == 0 or TEXT[span.start - 1] == " "  # starts at a word
    assert spans[0].start == 0 and spans[-1].end == len(TEXT)
    for prev, nxt in itertools.pairwise(spans):
        assert prev.start < nxt.start < prev.end  # consecutive chunks overlap


def test_no_overlap_tiles_the_text(embedder: EngineEmbedder) -> None:
    spans = chunk_spans([TEXT], embedder, 64, 0)[0]
    assert all(TEXT[a.end : b.start].strip() == "" for a, b in itertools.pairwise(spans))


def test_the_window_must_fit_the_model(embedder: EngineEmbedder) -> None:
    assert embedder.max_tokens == 254  # 256 minus [CLS] and [SEP]
    with pytest.raises(InvalidRequestError, match="--chunk-size 254"):
        chunk_spans([TEXT], embedder, 300, 10)
    with pytest.raises(InvalidRequestError, match="overlap"):
        chunk_spans([TEXT], embedder, 10, 10)


def test_windows_cut_inside_a_word_only_when_it_is_longer_than_a_window() -> None:
    # one 10-token word (contiguous offsets) followed by two 1-token words
    offsets = [(i, i + 1) for i in range(10)] + [(11, 14), (15, 18)]
    spans = windows(offsets, 4, 1)
    assert spans[0].tokens == 4 and spans[-1].end == 18
    assert windows([], 4, 1) == []
