"""The metadata tables. Their shape changes only by a migration under ``migrations/versions``."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

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
    Column("created_at", DateTime(timezone=True), nullable=False),
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
