"""Deployments: the run-time deployments made through the admin API (``lamina deploy``), restored on restart.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("engine", sa.String(100), nullable=True),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("min_replicas", sa.Integer, nullable=False),
        sa.Column("max_replicas", sa.Integer, nullable=False),
        sa.Column("target_concurrency", sa.Float, nullable=False),
        sa.Column("scale_to_zero", sa.Boolean, nullable=False),
        sa.Column("autoscale", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deployments")
