"""Layer: models."""

__all__: list[str] = []
