"""The catalog of served models: which names clients may ask for and which deployment answers each.

A deployment serves one registered model version under its deployment name. Clients may ask for the
deployment name, or for the registered ``NAME@VERSION`` / ``NAME@ALIAS`` it serves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from lamina.errors import ConflictError, ModelNotFoundError, NotFoundError
from lamina.models._engine import Capability
from lamina.models._openai import ModelCard


@dataclass(frozen=True)
class Route:
    """Where a request for a model name goes."""

    deployment: str
    served_name: str
    model_version: str | None
    capabilities: frozenset[str]


@dataclass(frozen=True)
class ServedModel:
    """One deployment as the catalog knows it."""

    deployment: str
    engine: str
    #: the registered ``NAME@VERSION`` it serves (None for engines that take no model file)
    model_ref: str | None
    #: what its engine says it can do (its descriptor's capabilities)
    engine_capabilities: frozenset[Capability] = frozenset()
    #: other names that reach it (``NAME@VERSION``, ``NAME@ALIAS``)
    aliases: tuple[str, ...] = ()
    #: epoch seconds of the model card (0: when the catalog first serves it)
    created: int = 0
    #: requests one replica runs at once (a GGUF engine's parallel slots)
    slots: int = 1

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(str(c) for c in self.engine_capabilities)


class Catalog:
    """Resolves model names to deployments; implements the gateway's ModelCatalog port.

    Deployments made at run time are added and removed while the gateway serves (``add``, ``remove``):
    each change swaps in new maps whole, so a reader on any thread sees the catalog before or after it.
    """

    def __init__(
        self, served: Sequence[ServedModel], readiness: Callable[[], Mapping[str, bool]] | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._served: dict[str, ServedModel] = {}
        self._names: dict[str, ServedModel] = {}
        self._index([*served])
        self._readiness = readiness or (lambda: {})

    def _index(self, served: list[ServedModel]) -> None:
        now = int(time.time())  # a card's `created` stays what it was when first served, call after call
        served = [s if s.created else replace(s, created=now) for s in served]
        names: dict[str, ServedModel] = {}
        for s in served:
            for name in (s.deployment, *s.aliases):
                names.setdefault(name, s)
        self._served, self._names = {s.deployment: s for s in served}, names

    def add(self, served: ServedModel) -> None:
        """Serve ``served`` from now on; ConflictError when a deployment of that name exists."""
        with self._lock:
            taken = self._names.get(served.deployment)
            if taken is not None:
                what = (
                    "exists already"
                    if taken.deployment == served.deployment
                    else f"reaches {taken.deployment!r}"
                )
                raise ConflictError(
                    f"the model name {served.deployment!r} {what}; undeploy it first or choose another name"
                )
            self._index([*self._served.values(), served])

    def remove(self, deployment: str) -> ServedModel:
        """Stop resolving names to ``deployment``; NotFoundError when there is none of that name."""
        with self._lock:
            served = self._served.get(deployment)
            if served is None:
                raise NotFoundError(f"no deployment named {deployment!r}; GET /v1/models lists them")
            self._index([s for s in self._served.values() if s.deployment != deployment])
            return served

    def get(self, deployment: str) -> ServedModel | None:
        """The catalog's entry for ``deployment``, if it serves one of that name."""
        return self._served.get(deployment)

    def models(self) -> list[ModelCard]:
        ready = self._readiness()
        return [
            ModelCard(
                id=s.deployment,
                created=s.created,
                capabilities=sorted(s.capabilities),
                version=s.model_ref,
                ready=bool(ready.get(s.deployment, False)),
            )
            for s in list(self._served.values())
        ]

    def serving(self, model_ref: str) -> str | None:
        """The deployment that serves the registered model ``model_ref`` (``name@version``), if one does."""
        return next((s.deployment for s in list(self._served.values()) if s.model_ref == model_ref), None)

    def resolve(self, name: str) -> Route:
        served = self._names.get(name)
        if served is None:
            available = ", ".join(sorted(self._served)) or "none"
            raise ModelNotFoundError(
                f"the model {name!r} does not exist; available models: {available}", param="model"
            )
        return Route(
            deployment=served.deployment,
            served_name=served.deployment,
            model_version=served.model_ref,
            capabilities=served.capabilities,
        )
