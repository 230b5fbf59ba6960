"""Config + state directory to the data layer's objects: catalog, vector store, embedder, pipeline.

Part of the composition root: ``lamina data`` builds it alone (no stack needs to run), and
``lamina.stack`` builds it beside the gateway on the gateway's own metadata store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from lamina.config import LaminaConfig
from lamina.data import LanceDBStore, PgVectorStore, VectorStore
from lamina.data._datasets import DatasetCatalog
from lamina.data._ingest import EmbeddingTokenizer, IngestPipeline
from lamina.data._openlineage import LineageEmitter
from lamina.errors import ModelNotFoundError
from lamina.models import BUNDLED, ModelVersion, Registry
from lamina.models._embedder import EngineEmbedder, HTTPEmbedder
from lamina.store import Store


def embedding_model(registry: Registry, ref: str) -> ModelVersion:
    """The registered embedding model ``ref``; a bundled one is registered on first use."""
    try:
        return registry.get(ref)
    except ModelNotFoundError:
        name = ref.partition("@")[0]
        bundled = next((b for b in BUNDLED if b.name == name), None)
        if bundled is None:
            raise
        registry.add(bundled.source, bundled.name, extra=bundled.extra)
        return registry.get(ref)


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

    def embedder(self) -> EmbeddingTokenizer:
        if self._embedder is None:
            cfg = self.config.data
            mv = embedding_model(self.registry, cfg.embedding_model)
            deployment = next(
                (d for d in self.config.deployments if d.model_ref == cfg.embedding_model), None
            )
            options = deployment.onnx if deployment is not None else None
            if self.gateway_url is not None:
                served = deployment.name if deployment is not None else cfg.embedding_model
                keys = self.config.server.api_keys
                self._embedder = HTTPEmbedder(
                    self.gateway_url, served, mv, api_key=keys[0] if keys else None,
                    max_length=options.max_length if options else 256,
                )  # fmt: skip
            else:
                self._embedder = EngineEmbedder(mv, options)
        return self._embedder

    def pipeline(self) -> IngestPipeline:
        return IngestPipeline(
            self.catalog, self.vectors, self.embedder(), self.lineage, self.state_dir / "locks"
        )

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
        if isinstance(self.vectors, PgVectorStore):
            self.vectors.close()
        self.lineage.close()
        if self.owns_store:
            self.store.close()


def open_data_stack(
    config: LaminaConfig,
    state_dir: Path,
    *,
    gateway_url: str | None = None,
    store: Store | None = None,
    registry: Registry | None = None,
) -> DataStack:
    """The migrated metadata store, registry, dataset catalog, vector store and lineage log of a state dir."""
    state_dir.mkdir(parents=True, exist_ok=True)
    owns_store = store is None
    if store is None:
        store = Store(config.database_url(state_dir))
        store.migrate()
    cfg = config.data
    vectors: VectorStore
    if cfg.vector_backend == "pgvector":
        assert cfg.pgvector_url is not None  # DataConfig refuses pgvector without a URL
        # graphs built from this server's tables, apart from those of any other server or schema
        server = hashlib.sha256(cfg.pgvector_url.encode()).hexdigest()[:12]
        vectors = PgVectorStore(cfg.pgvector_url, graph_dir=state_dir / "graphs" / f"pgvector-{server}")
    else:
        vectors = LanceDBStore(state_dir / "vectors")
    lineage = LineageEmitter(
        state_dir / "lineage" / "openlineage.jsonl",
        namespace=cfg.openlineage_namespace,
        url=cfg.openlineage_url,
    )
    return DataStack(
        config=config, state_dir=state_dir, store=store,
        registry=registry or Registry(store, state_dir / "blobs"),
        catalog=DatasetCatalog(store), vectors=vectors, lineage=lineage, gateway_url=gateway_url,
        owns_store=owns_store,
    )  # fmt: skip
