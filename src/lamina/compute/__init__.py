"""Layer: compute."""

__all__: list[str] = []
