"""Layer: application."""

__all__: list[str] = []
