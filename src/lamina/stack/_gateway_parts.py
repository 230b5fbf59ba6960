"""What the gateway applies to every call, assembled from the config: its policies (rate limits, costs and
budgets, input guards, the replay recorder), the response cache, the model groups' router, and how queries
are embedded for retrieval and the semantic cache."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lamina.application import (
    CostPolicy,
    ModelRouter,
    Policy,
    RagOptions,
    ReplayRecorder,
    ResponseCache,
    SemanticIndex,
    close_policies,
    gpu_hour_usd,
    replica_hourly_usd,
    response_cache,
)
from lamina.application.guards import input_guards
from lamina.compute import probe_inventory
from lamina.config import LaminaConfig
from lamina.data import AsyncEmbedder
from lamina.errors import LaminaError
from lamina.models import Catalog, DispatchQueryEmbedder, EngineEmbedder, Registry, ThreadQueryEmbedder
from lamina.orchestration import Dispatcher
from lamina.stack._data import DataStack
from lamina.stack._demo import rag_aliases

if TYPE_CHECKING:
    from lamina.stack.gateway import Stack

log = logging.getLogger("lamina")


@dataclass
class GatewayParts:
    """The gateway's policies (in the order a call meets them), cache, router and RAG aliases."""

    policies: list[Policy]
    cache: ResponseCache | None
    router: ModelRouter | None
    aliases: Mapping[str, tuple[str, RagOptions]]
    recorder: ReplayRecorder | None

    @classmethod
    def of(cls, stack: Stack) -> GatewayParts:
        policies = gateway_policies(stack)
        aliases = rag_aliases(stack.config, stack.catalog)  # the config's and the demo's
        recorder = _replay_recorder(
            stack, aliases
        )  # first: it settles last, after the others filled the call
        if recorder is not None:
            policies.insert(0, recorder)
        return cls(policies, _response_cache(stack), _router(stack), aliases, recorder)

    async def aclose(self) -> None:
        await close_policies(self.policies)
        if self.cache is not None:
            await self.cache.aclose()


def query_embedder(
    config: LaminaConfig, registry: Registry, catalog: Catalog, dispatcher: Dispatcher, data: DataStack
) -> tuple[AsyncEmbedder, str | None]:
    """Queries are embedded by a replica serving the datasets' embedding model, else in-process; with the
    ``name@version`` of that model."""
    try:
        ref = registry.get(config.data.embedding_model).ref
    except LaminaError:
        ref = None
    found = None if ref is None else QueryEmbedders(registry, catalog, dispatcher, data)(ref)
    return found or ThreadQueryEmbedder(data.embedder), ref


class QueryEmbedders:
    """The retriever's embedder for each embedding model ``name@version`` a dataset version was embedded
    with, looked up per query: the deployment serving that model now (so a rollout of the embedding
    deployment moves the queries of versions embedded with the new model to it, and those of older
    versions off it), else the model in this process (the datasets' own embedding model, or one from the
    registry, loaded on first use; at most ``MAX_LOADED`` kept), else None (the retriever refuses)."""

    MAX_LOADED = 4

    def __init__(self, registry: Registry, catalog: Catalog, dispatcher: Dispatcher, data: DataStack) -> None:
        self._registry, self._catalog, self._dispatcher, self._data = registry, catalog, dispatcher, data
        self._loaded: dict[str, AsyncEmbedder] = {}

    def __call__(self, model_ref: str) -> AsyncEmbedder | None:
        deployment = self._catalog.serving(model_ref)
        if deployment is not None:
            return DispatchQueryEmbedder(self._dispatcher, deployment, model_ref)
        loaded = self._loaded.get(model_ref)
        if loaded is None:
            loaded = self._load(model_ref)
            if loaded is None:
                return None
            while len(self._loaded) >= self.MAX_LOADED:  # the oldest goes; its model is freed when unused
                del self._loaded[next(iter(self._loaded))]
            self._loaded[model_ref] = loaded
        return loaded

    def _load(self, model_ref: str) -> AsyncEmbedder | None:
        try:
            if model_ref == self._data.embedding_model_ref():
                return ThreadQueryEmbedder(self._data.embedder)
            version = self._registry.get(model_ref)
        except LaminaError:
            return None
        return ThreadQueryEmbedder(lambda: EngineEmbedder(version, None))


def gateway_policies(stack: Stack) -> list[Policy]:
    """The gateway's policies from the config, in the order a call meets them."""
    from lamina.application import RateLimitPolicy

    config = stack.config
    served = [d.name for d in config.deployments] + [a.name for a in config.rag]
    served += [g.name for g in config.groups]
    # always on, even with no limit configured: a key created while the gateway runs may carry limits,
    # and a call that no limit applies to costs a few attribute reads (README, "Rate limits")
    policies: list[Policy] = [RateLimitPolicy(config.rate_limits, known_models=served)]
    policies.append(CostPolicy(stack.store, stack.config.costs, _replica_hourly_usd(stack)))
    # last: a call refused by a limit or a budget costs no guard time (README, "Guardrails")
    guards = input_guards(config.guards, stack.telemetry.metrics, stack.registry)
    if guards is not None:
        policies.append(guards)
    return policies + stack.extra_policies


def _replay_recorder(stack: Stack, aliases: Mapping[str, tuple[str, RagOptions]]) -> ReplayRecorder | None:
    """Keeps each request for `lamina replay` when observability.keep_requests is on (README, "Traces")."""
    if not stack.config.observability.keep_requests:
        return None
    return ReplayRecorder(stack.store, stack.drift, {name: options for name, (_, options) in aliases.items()})


def _router(stack: Stack) -> ModelRouter | None:
    """The model groups of the config (None: none), priced for lowest_cost in USD per million tokens: a
    member's token prices (costs.models, input and output averaged), else its replica's hourly compute
    price over its conservative tokens/s (costs.tokens_per_second)."""
    config = stack.config
    if not config.groups:
        return None
    costs = config.costs
    hourly = _replica_hourly_usd(stack) if any(g.strategy == "lowest_cost" for g in config.groups) else {}

    def cost_of(member: str) -> float | None:
        price = costs.models.get(member)
        if price is not None:
            return (price.input_per_million + price.output_per_million) / 2
        if member not in hourly:
            return None
        rate = costs.tokens_per_second.get(member, costs.default_tokens_per_second)
        return hourly[member] / (rate * 3600) * 1e6

    return ModelRouter(config.groups, stack.catalog, stack.telemetry, stack.readiness, cost_of=cost_of)


def _response_cache(stack: Stack) -> ResponseCache | None:
    """The response cache of the config (None: off). Its key is salted with the guard configuration; the
    semantic cache embeds with a query embedder built like the retriever's, into the vector store."""
    config = stack.config
    semantic = None
    if config.cache.enabled and config.cache.semantic.enabled:
        queries, _ = query_embedder(config, stack.registry, stack.catalog, stack.dispatcher, stack.data)
        semantic = SemanticIndex(
            stack.data.vectors,
            queries,
            min_similarity=config.cache.semantic.min_similarity,
            max_entries=config.cache.max_entries,
        )
    return response_cache(config.cache, stack.store, salt=config.guards.model_dump_json(), semantic=semantic)


def _replica_hourly_usd(stack: Stack) -> dict[str, float]:
    """USD per hour of one replica of each deployment: its cores (a GGUF replica's threads) and its GPUs,
    priced by the name of this machine's first GPU (NVML is asked only when a deployment uses a GPU)."""
    costs = stack.config.costs
    gpu_price = 0.0
    if any(w.resources.gpus for w in stack.workloads):
        names = [gpu.name for gpu in probe_inventory().gpus]
        price = gpu_hour_usd(costs, names[0]) if names else None
        if price is None:
            log.warning(
                "no price for the GPU %s: add it to costs.gpu_hour_usd; GPU time is priced at 0 until then",
                names[0] if names else "(none found)",
            )
        gpu_price = price or 0.0
    return {
        w.name: replica_hourly_usd(costs, w.resources.cpus, [gpu_price] * w.resources.gpus)
        for w in stack.workloads
    }
