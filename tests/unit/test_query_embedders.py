"""The gateway's per-model query embedders: the deployment serving a model now, else the model in process."""

from __future__ import annotations

from typing import Any

from lamina.errors import NotFoundError
from lamina.models import DispatchQueryEmbedder, ThreadQueryEmbedder
from lamina.stack._gateway_parts import QueryEmbedders


class Catalog:
    def __init__(self) -> None:
        self.served: dict[str, str] = {}

    def serving(self, model_ref: str) -> str | None:
        return self.served.get(model_ref)


class Registry:
    def get(self, ref: str) -> Any:
        if not ref.startswith("known-"):
            raise NotFoundError(f"no model {ref}")
        return object()


class Data:
    def embedding_model_ref(self) -> str:
        return "minilm-l6-v2@1"

    def embedder(self) -> Any:
        raise AssertionError("loaded on first use only")


def test_a_rollout_moves_a_models_queries_to_its_deployment_and_back_in_process() -> None:
    catalog = Catalog()
    embedders = QueryEmbedders(Registry(), catalog, dispatcher=None, data=Data())  # type: ignore[arg-type]
    catalog.served["minilm-l6-v2@1"] = "embeddings"
    assert isinstance(embedders("minilm-l6-v2@1"), DispatchQueryEmbedder)
    catalog.served = {"minilm-l6-v2@2": "embeddings"}  # rolled out: v1's versions are embedded in process
    own = embedders("minilm-l6-v2@1")
    assert isinstance(own, ThreadQueryEmbedder) and embedders("minilm-l6-v2@1") is own
    assert isinstance(embedders("minilm-l6-v2@2"), DispatchQueryEmbedder)


def test_unknown_models_get_none_and_at_most_four_are_kept_loaded() -> None:
    embedders = QueryEmbedders(Registry(), Catalog(), dispatcher=None, data=Data())  # type: ignore[arg-type]
    assert embedders("gone@3") is None
    first = embedders("known-0@1")
    assert first is not None and embedders("known-0@1") is first
    for i in range(1, 5):
        assert embedders(f"known-{i}@1") is not None
    assert embedders("known-0@1") is not first  # the oldest was let go, and is loaded again when asked
