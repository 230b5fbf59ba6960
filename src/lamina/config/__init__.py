"""The ``lamina.yaml`` schema: typed, documented, with defaults so that no file is needed.

The composition root (``lamina.stack``) loads it once and hands each layer its part. Nothing else reads
the file or the environment; :func:`load_config` is the one place that does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from lamina.config._base import Strict as _Strict
from lamina.config._demo import DemoConfig as DemoConfig
from lamina.config._gateway import (
    CacheConfig as CacheConfig,
)
from lamina.config._gateway import (
    CostsConfig as CostsConfig,
)
from lamina.config._gateway import GroupMemberConfig as GroupMemberConfig
from lamina.config._gateway import (
    GuardConfig as GuardConfig,
)
from lamina.config._gateway import (
    GuardsConfig as GuardsConfig,
)
from lamina.config._gateway import ModelGroupConfig as ModelGroupConfig
from lamina.config._gateway import (
    ModelPriceConfig as ModelPriceConfig,
)
from lamina.config._gateway import (
    ModelRateLimitsConfig as ModelRateLimitsConfig,
)
from lamina.config._gateway import (
    RateLimitsConfig as RateLimitsConfig,
)
from lamina.config._gateway import (
    RequestLimitsConfig as RequestLimitsConfig,
)
from lamina.config._gateway import RoutingRuleConfig as RoutingRuleConfig
from lamina.config._gateway import (
    SemanticCacheConfig as SemanticCacheConfig,
)
from lamina.config._gateway import check_groups
from lamina.config._jobs import JobsConfig as JobsConfig
from lamina.config._quantization import GateTolerance as GateTolerance
from lamina.config._quantization import QuantizationConfig as QuantizationConfig
from lamina.config._redact import REDACTED as REDACTED
from lamina.config._redact import mask_secrets, scrub
from lamina.config._redact import redact_url as redact_url
from lamina.config._serving import DEFAULT_WATCHDOG_S as DEFAULT_WATCHDOG_S
from lamina.config._serving import AutoscaleConfig as AutoscaleConfig
from lamina.config._serving import BatchingConfig as BatchingConfig
from lamina.config._serving import DeploymentConfig as DeploymentConfig
from lamina.config._serving import ObservabilityConfig as ObservabilityConfig
from lamina.config._serving import OrchestrationConfig as OrchestrationConfig
from lamina.config._serving import engine_blocks as engine_blocks
from lamina.errors import ConfigError

#: The environment variable that names the state directory when ``--state-dir`` is not given.
STATE_DIR_ENV = "LAMINA_STATE_DIR"
#: The bundled models, registered on first start.
BUNDLED_CHAT_MODEL = "smollm2-135m-instruct"
BUNDLED_EMBEDDING_MODEL = "minilm-l6-v2"
#: the alias of the version of a bundled model that the default deployments serve (``NAME@serving``):
#: the bundled chat model's Q8_0 variant once its accuracy gate passed, else the file as shipped
BUNDLED_SERVING_ALIAS = "serving"


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the gateway binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the gateway (0 picks a free one).")
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys the gateway accepts. Empty: any key (or none) is accepted, for local use.",
        json_schema_extra={"secret": True},
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the gateway answers to besides localhost, 127.0.0.1, [::1] and the bind "
        "address (a wildcard bind adds the machine's name and addresses); `*.example.com` matches its "
        "subdomains, `*` any host. Requests naming another Host are refused (DNS-rebinding protection).",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Web origins (`https://app.example.com`) whose pages may call the gateway, besides "
        "pages of its own hosts; `*` allows any. Requests from other origins are refused.",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="The gateway's event loop: uvloop (about 15% less CPU per request) or Python's own; "
        'uvloop falls back to asyncio where it is not installed. README, "Gateway overhead".',
    )


class StoreConfig(_Strict):
    url: str | None = Field(
        None,
        description="SQLAlchemy URL of the metadata store. Empty: a SQLite file `lamina.db` in the state "
        "directory. PostgreSQL: `postgresql+psycopg://user:pass@host/db`.",
    )


class DataConfig(_Strict):
    chunk_size: int = Field(
        200,
        ge=8,
        description="Tokens per chunk, counted with the embedding model's own tokenizer (special tokens not "
        "included). Keep it at most the model's max_length minus its special tokens (254 for MiniLM).",
    )
    chunk_overlap: int = Field(32, ge=0, description="Tokens shared by consecutive chunks of a document.")
    max_file_bytes: int = Field(
        50_000_000, ge=1, description="Larger source files are skipped (and listed with the reason)."
    )
    near_duplicate_bits: int = Field(
        6,
        ge=-1,
        le=16,
        description="Near-duplicate removal: documents whose 64-bit SimHashes differ in at most this many "
        "bits are duplicates and the later one is dropped. Unrelated texts differ in about 32 bits (the "
        "chance of 6 or fewer is below 1e-10); a few edited words in a page move 2 to 6. -1 turns "
        "near-duplicate removal off; exact duplicates are always removed.",
    )
    embedding_model: str = Field(
        BUNDLED_EMBEDDING_MODEL,
        description="Registry reference (NAME, NAME@VERSION or NAME@ALIAS) of the model that embeds chunks.",
    )
    embed_batch_size: int = Field(
        256, ge=1, description="Chunks embedded and written to the vector store per step of an ingest."
    )
    vector_backend: Literal["lancedb", "pgvector"] = Field(
        "lancedb",
        description="Where vectors live: lancedb (a directory `vectors` in the state directory) or "
        "pgvector (PostgreSQL at `pgvector_url`).",
    )
    pgvector_url: str | None = Field(
        None, description="PostgreSQL URL for the pgvector backend, e.g. postgresql://user:pass@host/db."
    )
    openlineage_url: str | None = Field(
        None,
        description="OpenLineage HTTP endpoint base (events are POSTed to <url>/api/v1/lineage), e.g. "
        "Marquez at http://127.0.0.1:5000. Empty: events go only to lineage/openlineage.jsonl in the "
        "state directory.",
    )
    openlineage_namespace: str = Field("lamina", description="OpenLineage namespace of ingest jobs.")
    ingest_roots: list[Path] = Field(
        default_factory=list,
        description="Directories the admin API may ingest from (POST /admin/v1/datasets/NAME/ingest reads "
        "the gateway machine's own files; relative request paths are under the first). Relative roots are "
        "resolved against the gateway's working directory. Empty: ingestion through the admin API is off "
        "(403); `lamina data ingest` is unaffected.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_size ({self.chunk_size})"
            )
        if self.vector_backend == "pgvector" and not self.pgvector_url:
            raise ValueError("vector_backend is pgvector but pgvector_url is empty; set pgvector_url")
        return self


def _default_deployments() -> list[DeploymentConfig]:
    return [
        DeploymentConfig(
            name=BUNDLED_CHAT_MODEL, model=f"{BUNDLED_CHAT_MODEL}@{BUNDLED_SERVING_ALIAS}", engine="gguf"
        ),
        DeploymentConfig(name=BUNDLED_EMBEDDING_MODEL, engine="onnx"),
    ]


class RagAliasConfig(_Strict):
    name: str = Field(description="The model name clients ask for to get answers grounded in `dataset`.")
    model: str = Field(description="The deployment that writes the answer.")
    dataset: str = Field(description="The dataset version to retrieve from: NAME, NAME@SEQ or NAME@TAG.")
    k: int = Field(4, ge=1, le=50, description="Passages put in the context.")
    mode: Literal["vector", "keyword", "hybrid"] = Field("hybrid", description="How to search.")


class LaminaConfig(_Strict):
    state_dir: Path | None = Field(
        None,
        description="Where Lamina keeps its state. Empty: --state-dir, then $LAMINA_STATE_DIR, then "
        "./.lamina.",
    )
    server: ServerConfig = Field(default_factory=ServerConfig, description="The HTTP gateway.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="The metadata store.")
    register_bundled: bool = Field(
        True, description="Register the bundled SmolLM2 and MiniLM models on start if they are missing."
    )
    deployments: list[DeploymentConfig] = Field(
        default_factory=_default_deployments, description="Models to serve and how."
    )
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="Replica processes and request retries."
    )
    observability: ObservabilityConfig = Field(
        default_factory=ObservabilityConfig, description="Traces and metrics."
    )
    data: DataConfig = Field(
        default_factory=DataConfig, description="Ingestion: chunking, de-duplication, embedding, vectors."
    )
    rag: list[RagAliasConfig] = Field(
        default_factory=list,
        description="Model names that answer with retrieval-augmented generation over a dataset.",
    )
    costs: CostsConfig = Field(
        default_factory=CostsConfig, description="Prices (compute and tokens) and spend budgets."
    )
    limits: RequestLimitsConfig = Field(
        default_factory=RequestLimitsConfig,
        description="What one request to the gateway may hold (body bytes, messages, inputs, tokens...).",
    )
    rate_limits: RateLimitsConfig = Field(
        default_factory=RateLimitsConfig,
        description="Requests and tokens per minute per key, per model and in all (counted in Redis across "
        "gateways).",
    )
    cache: CacheConfig = Field(
        default_factory=CacheConfig,
        description="The response cache: answers to deterministic requests, in process, the metadata store "
        "or Redis; optionally semantic.",
    )
    guards: GuardsConfig = Field(
        default_factory=GuardsConfig,
        description="Guardrails: PII and secrets, prompt injection, toxicity, blocked topics, answer length "
        "and JSON schema, on input and output.",
    )
    groups: list[ModelGroupConfig] = Field(
        default_factory=list,
        description="Model groups: one name for several deployments, with a strategy, retries and fallbacks.",
    )
    jobs: JobsConfig = Field(
        default_factory=JobsConfig,
        description="The job queue (batch embedding, evaluation, quantization): the devices it shares with "
        "serving, retries and preemption.",
    )
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig,
        description="Quantization: the accuracy gate's default tolerance and sample size.",
    )
    demo: DemoConfig = Field(
        default_factory=DemoConfig,
        description="The demo: Lamina's own documentation as a dataset with a RAG alias, on first start.",
    )

    @model_validator(mode="after")
    def _groups_consistent(self) -> LaminaConfig:
        check_groups(self.groups, [d.name for d in self.deployments], [a.name for a in self.rag])
        return self

    @model_validator(mode="after")
    def _unique_deployments(self) -> LaminaConfig:
        names = [d.name for d in self.deployments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"deployment names must be unique; repeated: {', '.join(dupes)}")
        clash = sorted({a.name for a in self.rag} & set(names))
        if clash:
            raise ValueError(f"RAG alias names must differ from deployment names; both: {', '.join(clash)}")
        missing = sorted({a.model for a in self.rag} - set(names))
        if missing:
            raise ValueError(f"RAG aliases name models that are not deployed: {', '.join(missing)}")
        return self

    def database_url(self, state_dir: Path) -> str:
        return self.store.url or f"sqlite:///{state_dir / 'lamina.db'}"

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with its secrets shown as ``***``: what ``lamina config show`` prints.

        Fields marked secret are replaced whole (a list item by item, so their number shows), and
        every string has the passwords of the URLs in it replaced (see ``redact_url``).
        """
        data = mask_secrets(self, self.model_dump(mode="json"))
        return {key: scrub(value) for key, value in data.items()}


def resolve_state_dir(flag: Path | None, config: LaminaConfig | None = None) -> Path:
    """``--state-dir``, then the config file's ``state_dir``, then $LAMINA_STATE_DIR, then ``./.lamina``."""
    if flag is not None:
        return flag.expanduser().resolve()
    if config is not None and config.state_dir is not None:
        return config.state_dir.expanduser().resolve()
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env).expanduser().resolve() if env else (Path.cwd() / ".lamina").resolve()


def _describe(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown field `{where}`: remove it or check its spelling (`lamina config schema` lists them)"
    return f"field `{where}`: {err['msg']} (got {err.get('input')!r})"


def load_config(path: Path | None) -> LaminaConfig:
    """Read ``lamina.yaml`` (or the defaults when ``path`` is None), raising one clear ConfigError."""
    if path is None:
        return LaminaConfig()
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; give an existing path or leave --config out")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the syntax at the position shown") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields, got {type(raw).__name__}")
    try:
        return LaminaConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())  # type: ignore[arg-type]
        raise ConfigError(f"{path}: {problems}") from exc
