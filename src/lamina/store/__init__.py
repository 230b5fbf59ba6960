"""The metadata store shared by every layer (a foundation, like config and errors)."""

from lamina.store._schema import metadata, model_aliases, model_versions, spans
from lamina.store._store import Store

__all__ = ["Store", "metadata", "model_aliases", "model_versions", "spans"]
