"""Data layer: datasets, immutable versions, chunk lineage, ingest runs.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    _create_versions()
    _create_contents()
    _create_lineage()
    _create_runs()


def _create_versions() -> None:
    """Datasets, their immutable versions and the tags that point at them."""
    op.create_table(
        "datasets",
        sa.Column("name", sa.String(48), primary_key=True),
        sa.Column("created_at", _TZ, nullable=False),
    )
    op.create_table(
        "dataset_versions",
        sa.Column("dataset", sa.String(48), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("version_id", sa.String(64), nullable=False),
        sa.Column("manifest", sa.JSON, nullable=False),
        sa.Column("pipeline_version", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
    )
    op.create_index("ix_dataset_versions_version_id", "dataset_versions", ["dataset", "version_id"])
    op.create_table(
        "dataset_tags",
        sa.Column("dataset", sa.String(48), primary_key=True),
        sa.Column("tag", sa.String(100), primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
    )


def _create_contents() -> None:
    """What each version holds: its chunk ids and its source files."""
    op.create_table(
        "dataset_members",
        sa.Column("version_id", sa.String(64), primary_key=True),
        sa.Column("chunk_id", sa.String(64), primary_key=True),
    )
    op.create_table(
        "dataset_sources",
        sa.Column("version_id", sa.String(64), primary_key=True),
        sa.Column("uri", sa.Text, primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("mtime", _TZ, nullable=False),
        sa.Column("documents", sa.JSON, nullable=False),
        sa.Column("n_chunks", sa.Integer, nullable=False),
    )


def _create_lineage() -> None:
    """Where each chunk came from and what embedded it."""
    op.create_table(
        "chunk_lineage",
        sa.Column("chunk_id", sa.String(64), primary_key=True),
        sa.Column("dataset", sa.String(48), nullable=False),
        sa.Column("source_uri", sa.Text, nullable=False),
        sa.Column("source_file", sa.Text, nullable=False),
        sa.Column("source_sha256", sa.String(64), nullable=False),
        sa.Column("byte_start", sa.BigInteger, nullable=False),
        sa.Column("byte_end", sa.BigInteger, nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("pipeline_version", sa.String(64), nullable=False),
        sa.Column("embedding_model", sa.String(300), nullable=False),
        sa.Column("embedding_sha256", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
    )
    op.create_index("ix_chunk_lineage_dataset_file", "chunk_lineage", ["dataset", "source_file"])


def _create_runs() -> None:
    """Ingest runs, with their state, counts and skipped files."""
    op.create_table(
        "ingest_runs",
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("dataset", sa.String(48), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", _TZ, nullable=False),
        sa.Column("finished_at", _TZ, nullable=True),
        sa.Column("counts", sa.JSON, nullable=False),
        sa.Column("skipped", sa.JSON, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("version_seq", sa.Integer, nullable=True),
    )
    op.create_index("ix_ingest_runs_dataset_state", "ingest_runs", ["dataset", "state"])


def downgrade() -> None:
    for table in (
        "ingest_runs",
        "chunk_lineage",
        "dataset_sources",
        "dataset_members",
        "dataset_tags",
        "dataset_versions",
        "datasets",
    ):
        op.drop_table(table)
