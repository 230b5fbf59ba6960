"""Lamina: a self-hostable AI infrastructure stack (compute, orchestration, data, models, application)."""

__version__ = "0.1.0"
