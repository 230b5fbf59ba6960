"""What the gateway needs from the layers below, as Protocols the composition root fills in.

The gateway depends on shapes, not classes: the models layer's catalog and the orchestration layer's
dispatcher fit these structurally, and a test can pass its own conforming classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import httpx

from lamina.models import ModelCard


class Route(Protocol):
    """Where a request for a model name goes (the models layer's frozen ``Route`` dataclass fits)."""

    @property
    def deployment(self) -> str: ...

    #: the name the replica serves, sent to it as the request's ``model``
    @property
    def served_name(self) -> str: ...

    @property
    def model_version(self) -> str | None: ...

    #: values of ``lamina.models.Capability``: chat, completion, embedding, streaming
    @property
    def capabilities(self) -> frozenset[str]: ...


class ModelCatalog(Protocol):
    """The models clients may ask for."""

    def models(self) -> list[ModelCard]: ...

    def resolve(self, name: str) -> Route:
        """The route of ``name``; raises ModelNotFoundError whose message lists the available ids."""
        ...


class DispatchResult(Protocol):
    """A replica's answer and where it came from."""

    @property
    def response(self) -> httpx.Response: ...

    @property
    def replica_id(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def attempts(self) -> int: ...


class Dispatcher(Protocol):
    """Sends a request to a ready replica of a deployment; failures are LaminaErrors (NoReadyReplicaError...).

    The replica's own error answers (HTTP 4xx/5xx with an OpenAI error body) come back as a result, not
    raised, so the gateway can relay them unchanged.
    """

    async def request(
        self,
        deployment: str,
        path: str,
        json_body: Mapping[str, Any],
        /,
        headers: Mapping[str, str] | None = None,
    ) -> DispatchResult: ...

    def stream(
        self,
        deployment: str,
        path: str,
        json_body: Mapping[str, Any],
        /,
        headers: Mapping[str, str] | None = None,
    ) -> AbstractAsyncContextManager[DispatchResult]:
        """Yields a result whose ``response`` is still streaming; leaving the block closes it."""
        ...


#: deployment name -> whether it has a ready replica now
Readiness = Callable[[], Mapping[str, bool]]
