"""Chunking measured in the embedding model's own tokens, with byte spans into the source.

A chunk holds at most ``size`` tokens of the embedder's tokenizer (special tokens not counted: the
tokenizer says how many of those it adds, and ``size`` must leave room for them), so the model embeds all
of it and truncates nothing. Consecutive chunks share ``overlap`` tokens, so a sentence cut at a border
is whole in one of them.

Borders fall between words where possible: a window ends before the first token of a word and the next
starts at one, so a chunk never begins with half a word (``##ing``) and the model re-tokenises a chunk's
text into the same tokens it was measured in. A single word longer than a window is cut inside.

The data layer declares the tokenizer it needs (``ChunkTokenizer``); the models layer's embedder is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from lamina.data.vectors import Embedder
from lamina.errors import InvalidRequestError

#: (start, end) character offsets of one token in the text it came from.
Offsets = tuple[int, int]


@runtime_checkable
class ChunkTokenizer(Protocol):
    """The embedder's tokenizer, as chunking needs it."""

    @property
    def max_tokens(self) -> int:
        """Tokens of text one embedding input holds, special tokens excluded."""
        ...

    def token_offsets(self, texts: Sequence[str]) -> list[list[Offsets]]:
        """Per text, the character offsets of its tokens: no special tokens, no truncation."""
        ...


class EmbeddingTokenizer(Embedder, ChunkTokenizer, Protocol):
    """An embedder that also exposes its tokenizer for chunking (the models layer's embedders do)."""


@dataclass(frozen=True, slots=True)
class TextSpan:
    """A chunk's place in its document's text: characters ``[start, end)`` and its token count."""

    start: int
    end: int
    tokens: int


def check_window(size: int, overlap: int, max_tokens: int) -> None:
    if size < 1 or overlap < 0 or overlap >= size:
        raise InvalidRequestError(
            f"chunk size {size} and overlap {overlap}: need size >= 1 and 0 <= overlap < size", param="chunk"
        )
    if size > max_tokens:
        raise InvalidRequestError(
            f"chunk size {size} exceeds the embedding model's {max_tokens} tokens per input; "
            f"use --chunk-size {max_tokens} or less",
            param="chunk_size",
        )


def _word_starts(offsets: Sequence[Offsets]) -> list[bool]:
    """Whether each token begins a word: whitespace (or the text's start) precedes it."""
    return [i == 0 or offsets[i][0] > offsets[i - 1][1] for i in range(len(offsets))]


def _back_to_word(starts: list[bool], pos: int, floor: int) -> int:
    """The last word start in ``(floor, pos]``, or ``pos`` when there is none."""
    for i in range(pos, floor, -1):
        if starts[i]:
            return i
    return pos


def windows(offsets: Sequence[Offsets], size: int, overlap: int) -> list[TextSpan]:
    """Token windows of at most ``size`` tokens, ``overlap`` shared, borders at word starts."""
    n = len(offsets)
    if n == 0:
        return []
    starts = [*_word_starts(offsets), True]  # the end of the text is a border too
    spans: list[TextSpan] = []
    begin = 0
    while True:
        end = min(begin + size, n)
        if end < n:
            end = _back_to_word(starts, end, begin)
        spans.append(TextSpan(offsets[begin][0], offsets[end - 1][1], end - begin))
        if end >= n:
            return spans
        nxt = _back_to_word(starts, max(end - overlap, begin + 1), begin)
        begin = nxt if nxt > begin else end


def chunk_spans(
    texts: Sequence[str], tokenizer: ChunkTokenizer, size: int, overlap: int
) -> list[list[TextSpan]]:
    """The chunk spans of each text; texts are tokenised in one batch."""
    check_window(size, overlap, tokenizer.max_tokens)
    return [windows(offsets, size, overlap) for offsets in tokenizer.token_offsets(texts)]
