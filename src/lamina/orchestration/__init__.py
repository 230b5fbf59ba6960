"""Layer: orchestration."""

__all__: list[str] = []
