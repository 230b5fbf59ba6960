"""A cheap embedder that implements the data layer's ``EmbeddingTokenizer`` for real.

Whitespace tokens with their offsets, and a unit vector from a BLAKE2b digest of the text: what tests and
benchmarks of the ingestion pipeline use when the model is not what they measure.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"\S+")


class HashingEmbedder:
    """``dim``-dimensional unit vectors (``dim`` up to 32), one per distinct text, and whitespace tokens."""

    name = "hashing-embedder@1"
    sha256 = hashlib.sha256(b"hashing-embedder@1").hexdigest()
    max_tokens = 512

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=2 * self.dim).digest()
            v = np.frombuffer(digest, dtype=np.uint16).astype(np.float64) - 32767.5
            out.append((v / np.linalg.norm(v)).tolist())
        return out

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 2

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        return [[m.span() for m in _TOKEN.finditer(text)] for text in texts]
