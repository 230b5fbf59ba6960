"""The models catalog takes deployments added and removed while the gateway serves."""

from __future__ import annotations

import pytest

from lamina.errors import ConflictError, ModelNotFoundError, NotFoundError
from lamina.models import Capability, Catalog, ServedModel


def served(name: str, ref: str | None = None, aliases: tuple[str, ...] = ()) -> ServedModel:
    return ServedModel(name, "fake", ref, frozenset({Capability.CHAT}), aliases)


def test_added_deployments_resolve_at_once_and_removed_ones_stop() -> None:
    catalog = Catalog([served("chat", "qwen@1", ("qwen@1", "qwen"))], readiness=lambda: {"chat": True})
    catalog.add(served("echo"))
    assert catalog.resolve("echo").deployment == "echo"
    assert [m.id for m in catalog.models()] == ["chat", "echo"]
    assert catalog.get("echo") is not None
    catalog.remove("echo")
    with pytest.raises(ModelNotFoundError, match="available models: chat"):
        catalog.resolve("echo")
    assert catalog.resolve("qwen").deployment == "chat"  # the others are untouched
    with pytest.raises(NotFoundError, match="no deployment named 'echo'"):
        catalog.remove("echo")


def test_a_name_that_reaches_a_deployment_is_refused() -> None:
    catalog = Catalog([served("chat", "qwen@1", ("qwen@1", "qwen"))])
    with pytest.raises(ConflictError, match="exists already"):
        catalog.add(served("chat"))
    with pytest.raises(ConflictError, match="reaches 'chat'"):
        catalog.add(served("qwen"))
    assert [m.id for m in catalog.models()] == ["chat"]
