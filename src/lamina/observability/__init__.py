"""Layer: observability."""

__all__: list[str] = []
