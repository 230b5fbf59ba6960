"""The ``lamina`` command line."""

from lamina.cli._app import app, main

__all__ = ["app", "main"]
