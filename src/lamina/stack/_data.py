"""Config + state directory to the data layer's objects: catalog, vector store, embedder, pipeline.

``lamina data`` builds it alone (no stack needs to run, and no web server is imported), and
``lamina.stack.gateway`` builds it beside the gateway on the gateway's own metadata store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from lamina.config import DeploymentConfig, LaminaConfig
from lamina.data import (
    CatalogResolver,
    DatasetCatalog,
    DriftChecker,
    DriftReports,
    DriftWindow,
    EmbeddingTokenizer,
    IngestPipeline,
    LanceDBStore,
    LineageEmitter,
    PgVectorStore,
    Retriever,
    VectorStore,
)
from lamina.models import (
    EngineEmbedder,
    HTTPEmbedder,
    ONNXOptions,
    Registry,
    ThreadQueryEmbedder,
    check_deployment,
    registered_or_bundled,
)
from lamina.store import Store


def checked_config(config: LaminaConfig) -> LaminaConfig:
    """``config`` with every deployment's engine and engine options checked against the installed engine
    plugins (their descriptors) and defaults filled in: what the config file may not say alone."""
    return config.model_copy(update={"deployments": [check_deployment(d) for d in config.deployments]})


def open_store(config: LaminaConfig, state_dir: Path) -> Store:
    """The migrated metadata store of a state directory (created readable by its owner only)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = Store(config.database_url(state_dir))
    store.migrate()
    return store


def registry_of(store: Store, state_dir: Path) -> Registry:
    """The model registry of a state directory whose store is open (its files under ``blobs/``)."""
    return Registry(store, state_dir / "blobs")


def open_registry(config: LaminaConfig, state_dir: Path) -> tuple[Store, Registry]:
    """The migrated metadata store and the model registry of a state directory."""
    store = open_store(config, state_dir)
    return store, registry_of(store, state_dir)


@dataclass
class DataStack:
    """The data layer of one state directory. The embedder loads on first use (listing needs none)."""

    config: LaminaConfig
    state_dir: Path
    store: Store
    registry: Registry
    catalog: DatasetCatalog
    vectors: VectorStore
    lineage: LineageEmitter
    gateway_url: str | None = None
    #: False when the store was handed in (the caller closes it)
    owns_store: bool = True
    _embedder: EngineEmbedder | HTTPEmbedder | None = field(default=None, repr=False)

    def _embedding_deployment(self) -> DeploymentConfig | None:
        ref = self.config.data.embedding_model
        return next((d for d in self.config.deployments if d.model_ref == ref), None)

    def embedding_model_ref(self) -> str:
        """``name@version`` of the datasets' embedding model (registered now if it is a bundled one)."""
        return registered_or_bundled(self.registry, self.config.data.embedding_model).ref

    def embedder(self) -> EmbeddingTokenizer:
        """The datasets' embedding model: in this process, or through the running stack at gateway_url."""
        if self._embedder is None:
            mv = registered_or_bundled(self.registry, self.config.data.embedding_model)
            deployment = self._embedding_deployment()
            options = (
                None if deployment is None else ONNXOptions.model_validate(deployment.options_for("onnx"))
            )
            if self.gateway_url is None:
                self._embedder = EngineEmbedder(mv, options)
            else:
                keys = self.config.server.api_keys
                self._embedder = HTTPEmbedder(
                    self.gateway_url,
                    deployment.name if deployment is not None else self.config.data.embedding_model,
                    mv,
                    api_key=keys[0] if keys else None,
                    max_length=options.max_length if options else 256,
                )
        return self._embedder

    def pipeline(self) -> IngestPipeline:
        return IngestPipeline(self.catalog, self.vectors, self.embedder(), self.lineage)

    def retriever(self) -> Retriever:
        """Retrieval with queries embedded in this process (the model loads on the first vector query)."""
        return Retriever(
            self.catalog, self.vectors, ThreadQueryEmbedder(self.embedder), self.embedding_model_ref()
        )

    def drift_checker(self) -> DriftChecker:
        """Drift checks of this state directory's datasets against the traffic its gateway sampled."""
        return DriftChecker(
            resolver=CatalogResolver(self.catalog),
            vectors=self.vectors,
            window=DriftWindow(self.store),
            reports=DriftReports(self.store),
        )

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
        self.vectors.close()
        self.lineage.close()
        if self.owns_store:
            self.store.close()


def open_vectors(config: LaminaConfig, state_dir: Path) -> VectorStore:
    """The configured vector store: LanceDB in the state directory, or pgvector by URL."""
    cfg = config.data
    if cfg.vector_backend == "pgvector":
        assert cfg.pgvector_url is not None  # DataConfig refuses pgvector without a URL
        # graphs built from this server's tables, apart from those of any other server or schema
        server = hashlib.sha256(cfg.pgvector_url.encode()).hexdigest()[:12]
        return PgVectorStore(cfg.pgvector_url, graph_dir=state_dir / "graphs" / f"pgvector-{server}")
    return LanceDBStore(state_dir / "vectors")


def open_data_stack(
    config: LaminaConfig,
    state_dir: Path,
    *,
    gateway_url: str | None = None,
    store: Store | None = None,
    registry: Registry | None = None,
) -> DataStack:
    """The migrated metadata store, registry, dataset catalog, vector store and lineage log of a state dir."""
    owns_store = store is None
    if store is None:
        store = open_store(config, state_dir)
    lineage = LineageEmitter(
        state_dir / "lineage" / "openlineage.jsonl",
        namespace=config.data.openlineage_namespace,
        url=config.data.openlineage_url,
    )
    return DataStack(
        config=config,
        state_dir=state_dir,
        store=store,
        registry=registry or registry_of(store, state_dir),
        catalog=DatasetCatalog(store),
        vectors=open_vectors(config, state_dir),
        lineage=lineage,
        gateway_url=gateway_url,
        owns_store=owns_store,
    )
