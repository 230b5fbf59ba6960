"""Traces: one summary row per stored trace (listing, retention, the doctor), and a time index on spans' ends.

The ``spans`` table (0001) keeps every stored span; ``traces`` keeps one row per trace that the tail-aware
sampler kept: where its time went per layer, which layer took longest, and the bytes its spans take, so
retention can bound the store by size without scanning span attributes.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "traces",
        sa.Column("trace_id", sa.String(32), primary_key=True),
        sa.Column("start_ns", sa.BigInteger, nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("route", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("layers", sa.JSON, nullable=False),
        sa.Column("bottleneck", sa.String(40), nullable=True),
        sa.Column("kept", sa.String(10), nullable=False),
        sa.Column("span_count", sa.Integer, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
    )
    op.create_index("ix_traces_start_ns", "traces", ["start_ns"])


def downgrade() -> None:
    op.drop_index("ix_traces_start_ns", table_name="traces")
    op.drop_table("traces")
