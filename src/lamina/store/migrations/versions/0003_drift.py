"""Drift: sampled request embeddings per dataset and stored drift reports.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drift_samples",
        sa.Column("dataset", sa.String(48), primary_key=True),
        sa.Column("bucket", sa.BigInteger, primary_key=True),
        sa.Column("slot", sa.Integer, primary_key=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("length", sa.Integer, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_drift_samples_dataset_ts", "drift_samples", ["dataset", "ts"])
    op.create_table(
        "drift_buckets",
        sa.Column("dataset", sa.String(48), primary_key=True),
        sa.Column("bucket", sa.BigInteger, primary_key=True),
        sa.Column("seen", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "drift_reports",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("dataset", sa.String(48), nullable=False),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("window", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verdict", sa.String(20), nullable=False),
        sa.Column("drifted", sa.Boolean, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("explanation", sa.Text, nullable=False),
    )
    op.create_index("ix_drift_reports_dataset_created_at", "drift_reports", ["dataset", "created_at"])


def downgrade() -> None:
    op.drop_table("drift_reports")
    op.drop_table("drift_buckets")
    op.drop_table("drift_samples")
