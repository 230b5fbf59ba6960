"""The metadata tables. Their shape changes only by a migration under ``migrations/versions``."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from lamina.store._columns import UTCDateTime

metadata = MetaData()

model_versions = Table(
    "model_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("version", String(100), nullable=False),
    Column("format", String(20), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("source", Text, nullable=False, comment="what the user gave: a path, package:, hf: URI"),
    Column("path", Text, nullable=False, comment="the content-addressed file in the state directory"),
    Column("extra_files", JSON, nullable=False, comment="companion files by role, e.g. tokenizer"),
    Column("meta", JSON, nullable=False, comment="what the file says about itself"),
    Column("created_at", UTCDateTime(), nullable=False),
    UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
)

model_aliases = Table(
    "model_aliases",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("alias", String(100), primary_key=True),
    Column("version", String(100), nullable=False),
)

spans = Table(
    "spans",
    metadata,
    Column("span_id", String(16), primary_key=True),
    Column("trace_id", String(32), nullable=False),
    Column("parent_span_id", String(16), nullable=True),
    Column("name", String(200), nullable=False),
    Column("layer", String(40), nullable=True),
    Column("start_ns", BigInteger, nullable=False),
    Column("end_ns", BigInteger, nullable=False),
    Column("status", String(10), nullable=False),
    Column("attributes", JSON, nullable=False),
    Index("ix_spans_trace_id", "trace_id"),
    Index("ix_spans_start_ns", "start_ns"),
)

# -- data (migration 0002) ----------------------------------------------------------------------------------

datasets = Table(
    "datasets",
    metadata,
    Column("name", String(48), primary_key=True),
    Column("created_at", UTCDateTime(), nullable=False),
)

dataset_versions = Table(
    "dataset_versions",
    metadata,
    Column("dataset", String(48), primary_key=True),
    Column("seq", Integer, primary_key=True, comment="per-dataset sequence number, for people: docs@3"),
    Column("version_id", String(64), nullable=False, comment="sha256 of the canonical manifest"),
    Column("manifest", JSON, nullable=False, comment="the canonical manifest the id hashes"),
    Column("pipeline_version", String(64), nullable=False),
    Column("run_id", String(36), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_dataset_versions_version_id", "dataset", "version_id"),
)

dataset_tags = Table(
    "dataset_tags",
    metadata,
    Column("dataset", String(48), primary_key=True),
    Column("tag", String(100), primary_key=True),
    Column("seq", Integer, nullable=False),
)

dataset_members = Table(
    "dataset_members",
    metadata,
    Column("version_id", String(64), primary_key=True, comment="content-addressed: shared by equal versions"),
    Column("chunk_id", String(64), primary_key=True),
)

dataset_sources = Table(
    "dataset_sources",
    metadata,
    Column("version_id", String(64), primary_key=True),
    Column("uri", Text, primary_key=True),
    Column("sha256", String(64), nullable=False, comment="of the file's bytes"),
    Column("size_bytes", BigInteger, nullable=False),
    Column("mtime", UTCDateTime(), nullable=False),
    Column("documents", JSON, nullable=False, comment="kept documents: [uri, text sha256, simhash hex]"),
    Column("n_chunks", Integer, nullable=False),
)

chunk_lineage = Table(
    "chunk_lineage",
    metadata,
    Column("chunk_id", String(64), primary_key=True),
    Column("dataset", String(48), nullable=False),
    Column("source_uri", Text, nullable=False, comment="the document: the file, or file#line=N / #row=N"),
    Column("source_file", Text, nullable=False, comment="the file the document came from"),
    Column("source_sha256", String(64), nullable=False, comment="of the file's bytes"),
    Column("byte_start", BigInteger, nullable=False, comment="UTF-8 offsets into the document's text"),
    Column("byte_end", BigInteger, nullable=False),
    Column("content_sha256", String(64), nullable=False, comment="of the chunk's text"),
    Column("pipeline_version", String(64), nullable=False),
    Column("embedding_model", String(300), nullable=False, comment="name@version"),
    Column("embedding_sha256", String(64), nullable=False),
    Column("run_id", String(36), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_chunk_lineage_dataset_file", "dataset", "source_file"),
)

ingest_runs = Table(
    "ingest_runs",
    metadata,
    Column("run_id", String(36), primary_key=True),
    Column("dataset", String(48), nullable=False),
    Column("state", String(20), nullable=False, comment="running, completed, unchanged, failed, abandoned"),
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("counts", JSON, nullable=False),
    Column("skipped", JSON, nullable=False, comment="[[path, reason], ...]"),
    Column("error", Text, nullable=True),
    Column("version_seq", Integer, nullable=True),
    Index("ix_ingest_runs_dataset_state", "dataset", "state"),
)


# -- drift (migration 0003) ---------------------------------------------------------------------------------

drift_samples = Table(
    "drift_samples",
    metadata,
    Column("dataset", String(48), primary_key=True),
    Column("bucket", BigInteger, primary_key=True, comment="start of its time bucket, epoch seconds"),
    Column("slot", Integer, primary_key=True, comment="position in the bucket's reservoir"),
    Column("ts", UTCDateTime(), nullable=False),
    Column("text", Text, nullable=False, comment="the prompt, truncated"),
    Column("length", Integer, nullable=False, comment="the whole prompt's length in characters"),
    Column("vector", LargeBinary, nullable=False, comment="float32 little-endian embedding"),
    Index("ix_drift_samples_dataset_ts", "dataset", "ts"),
)

drift_buckets = Table(
    "drift_buckets",
    metadata,
    Column("dataset", String(48), primary_key=True),
    Column("bucket", BigInteger, primary_key=True, comment="start of the time bucket, epoch seconds"),
    Column("seen", BigInteger, nullable=False, comment="requests offered to this bucket's reservoir"),
)

drift_reports = Table(
    "drift_reports",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("dataset", String(48), nullable=False),
    Column("version", String(100), nullable=False),
    Column("window", String(20), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("verdict", String(20), nullable=False, comment="drift, no_drift or insufficient_data"),
    Column("drifted", Boolean, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("explanation", Text, nullable=False),
    Index("ix_drift_reports_dataset_created_at", "dataset", "created_at"),
)


# -- keys (migration 0004) ----------------------------------------------------------------------------------

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True, comment="public key id: key_ + 12 url-safe characters"),
    Column("name", String(100), nullable=False),
    Column(
        "secret_hash",
        String(64),
        nullable=False,
        comment="sha256 hex of the secret: 256-bit random secrets need no slow hash",
    ),
    Column("prefix", String(16), nullable=False, comment="the secret's first characters, for display"),
    Column("scope", String(10), nullable=False, comment="admin or user"),
    Column("models", JSON, nullable=True, comment="model names the key may call; null: all"),
    Column("datasets", JSON, nullable=True, comment="datasets the key may read; null: all"),
    Column("rpm", Integer, nullable=True, comment="requests per minute; null: no limit"),
    Column("tpm", Integer, nullable=True, comment="tokens per minute; null: no limit"),
    Column("budget_usd", Float, nullable=True, comment="spend allowed per budget period; null: no budget"),
    Column("budget_period", String(10), nullable=True, comment="day, week or month"),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    UniqueConstraint("name", name="uq_api_keys_name"),
    Index("ix_api_keys_secret_hash", "secret_hash", unique=True),
)


# -- costs (migration 0005) ---------------------------------------------------------------------------------

budget_spend = Table(
    "budget_spend",
    metadata,
    Column("scope", String(140), primary_key=True, comment="global, or key:<key id>"),
    Column("period_start", BigInteger, primary_key=True, comment="start of the budget period, epoch seconds"),
    Column("spent_nusd", BigInteger, nullable=False, comment="settled spend in nano-USD"),
    Column("reserved_nusd", BigInteger, nullable=False, comment="held by calls in flight, nano-USD"),
)

cost_ledger = Table(
    "cost_ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", UTCDateTime(), nullable=False),
    Column("trace_id", String(32), nullable=True),
    Column("key_id", String(100), nullable=True, comment="null: no keys configured (anonymous)"),
    Column("key_name", String(100), nullable=False),
    Column("operation", String(40), nullable=False, comment="chat, text_completion, embeddings"),
    Column("model", String(200), nullable=False, comment="the model name the client asked for"),
    Column("deployment", String(200), nullable=False),
    Column("model_version", String(300), nullable=True),
    Column("replica", String(200), nullable=True),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("engine_s", Float, nullable=True, comment="the replica's compute time for the call"),
    Column("cost_usd", Float, nullable=False),
    Column("basis", String(10), nullable=False, comment="compute or tokens"),
    Index("ix_cost_ledger_ts", "ts"),
    Index("ix_cost_ledger_key_id_ts", "key_id", "ts"),
)


# -- prompt templates (migration 0007) ----------------------------------------------------------------------

prompt_versions = Table(
    "prompt_versions",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("version", Integer, primary_key=True, comment="1, 2, ... per name; a version never changes"),
    Column("messages", JSON, nullable=True, comment="[{role, content}], each content a Jinja2 template"),
    Column("prompt", Text, nullable=True, comment="a plain prompt template; null for a chat template"),
    Column("variables", JSON, nullable=False, comment="a JSON Schema per variable name"),
    Column("description", Text, nullable=False),
    Column("sha256", String(64), nullable=False, comment="of the canonical templates and variables"),
    Column("created_at", UTCDateTime(), nullable=False),
)

#: the response cache's answers (application/_cache_store.py): keyed by the request's digest, times in
#: seconds since the epoch, ``used_at`` for least-recently-used eviction
cache_entries = Table(
    "cache_entries",
    metadata,
    Column("key", String(64), primary_key=True, comment="SHA-256 of the normalised request and its versions"),
    Column("value", LargeBinary, nullable=False, comment="the stored answer"),
    Column("size_bytes", Integer, nullable=False),
    Column("expires_at", Float, nullable=False, comment="seconds since the epoch"),
    Column(
        "used_at", Float, nullable=False, comment="last served or stored, for least-recently-used eviction"
    ),
    Index("ix_cache_entries_used_at", "used_at"),
    Index("ix_cache_entries_expires_at", "expires_at"),
)


# -- replay requests (migration 0012) -----------------------------------------------------------------------

#: what ``lamina replay`` needs to send a traced request again, pinned to the same versions
replay_requests = Table(
    "replay_requests",
    metadata,
    Column("trace_id", String(32), primary_key=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("route", String(100), nullable=False, comment="the API path, e.g. /v1/chat/completions"),
    Column("body", JSON, nullable=False, comment="the request body after templates"),
    Column("versions", JSON, nullable=False, comment="model, dataset, template versions and seed"),
    Column("answer", JSON, nullable=True, comment="answer text (truncated), citations, per-layer seconds"),
    Index("ix_replay_requests_created_at", "created_at"),
)


# -- quantized variants and their accuracy gate (migration 0010) ---------------------------------------------

#: one row per quantized variant (a ``model_versions`` row of the same name and version): where it came
#: from, how, and the gate's figures; a ``failed`` variant never serves
model_gate = Table(
    "model_gate",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("version", String(100), primary_key=True),
    Column("parent_version", String(100), nullable=False, comment="the version it was quantized from"),
    Column("method", String(40), nullable=False, comment="e.g. onnx-int8-per-channel, gguf-q4_0"),
    Column("status", String(10), nullable=False, comment="passed or failed"),
    Column("figures", JSON, nullable=False, comment="what the evaluation measured"),
    Column("tolerance", JSON, nullable=False, comment="the limits the figures were held to"),
    Column("dataset", String(100), nullable=True, comment="the dataset version evaluated on, if any"),
    Column("created_at", UTCDateTime(), nullable=False),
)


# -- traces (migration 0011) --------------------------------------------------------------------------------

#: one row per trace the tail-aware sampler kept (observability/_store_exporter.py): its per-layer time in
#: ms, the layer that took longest and the bytes its spans take (for retention by size)
traces = Table(
    "traces",
    metadata,
    Column("trace_id", String(32), primary_key=True),
    Column("start_ns", BigInteger, nullable=False, comment="the root span's start, epoch nanoseconds"),
    Column("duration_ms", Float, nullable=False),
    Column("status", String(10), nullable=False, comment="ok or error"),
    Column("http_status", Integer, nullable=True),
    Column("route", String(100), nullable=False, comment="the gateway endpoint, e.g. /v1/chat/completions"),
    Column("model", String(200), nullable=False, comment="the deployment that served it; empty if none"),
    Column("layers", JSON, nullable=False, comment="{layer: ms}, the same numbers as x-lamina-layers"),
    Column("bottleneck", String(40), nullable=True, comment="the layer that took longest"),
    Column("kept", String(10), nullable=False, comment="why it was stored: error, slow or sampled"),
    Column("span_count", Integer, nullable=False),
    Column("size_bytes", Integer, nullable=False, comment="approximate bytes of its spans' rows"),
    Index("ix_traces_start_ns", "start_ns"),
)
