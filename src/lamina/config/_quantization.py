"""The ``quantization`` section: how far a quantized variant may drift from its parent and still serve."""

from __future__ import annotations

from pydantic import Field

from lamina.config._base import Strict


class GateTolerance(Strict):
    """The accuracy gate's limits; each applies to the figure it names, for the formats that measure it."""

    min_cosine: float = Field(
        0.98, ge=-1, le=1, description="Embeddings: the least cosine any text's two vectors may have."
    )
    min_mean_cosine: float = Field(
        0.99, ge=-1, le=1, description="Embeddings: the least mean cosine over the texts."
    )
    max_ndcg_drop: float = Field(
        0.01, ge=0, le=1, description="Embeddings: the most nDCG@10 may drop (with labelled queries)."
    )
    min_agreement: float = Field(
        0.9, ge=0, le=1, description="Chat: the least share of positions whose greedy next tokens agree."
    )
    max_perplexity_ratio: float = Field(
        1.1, ge=1, description="Chat: the most the variant's perplexity may be, over the parent's."
    )


class QuantizationConfig(Strict):
    tolerance: GateTolerance = Field(
        default_factory=GateTolerance,
        description="The accuracy gate's default limits (`lamina models quantize --tolerance` overrides "
        "each).",
    )
    sample: int = Field(
        256, ge=1, description="Chunks of a dataset version the gate embeds (`--sample` overrides it)."
    )
