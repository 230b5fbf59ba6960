"""The ``demo`` section: Lamina's own documentation as a dataset with a RAG alias, on first start."""

from __future__ import annotations

from pydantic import Field

from lamina.config._base import Strict


class DemoConfig(Strict):
    enabled: bool | None = Field(
        None,
        description="Ingest Lamina's own documentation (shipped in the package) on first start, in the "
        "background, as the dataset `dataset`, and answer from it under the model name `alias`. Empty: on "
        "when the bundled models are (register_bundled); false turns it off. An existing dataset of that "
        "name is never ingested again.",
    )
    dataset: str = Field("lamina-docs", description="The demo dataset's name.")
    alias: str = Field("lamina-docs", description="The RAG alias that answers from the demo dataset.")
    model: str | None = Field(
        None, description="The deployment that writes the demo's answers. Empty: the first chat deployment."
    )
    k: int = Field(3, ge=1, le=20, description="Passages of the documentation put in the context.")

    def on(self, register_bundled: bool) -> bool:
        """Whether the demo runs under a config whose ``register_bundled`` is as given."""
        return register_bundled if self.enabled is None else self.enabled
