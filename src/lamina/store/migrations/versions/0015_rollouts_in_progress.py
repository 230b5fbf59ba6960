"""Rollouts in progress: what a rollout not finished yet was asked to do, so that a restart begins it again.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollouts_in_progress",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("strategy", sa.String(20), nullable=False),
        sa.Column("weight", sa.Integer, nullable=False),
        sa.Column("policy", sa.JSON, nullable=True),
        sa.Column("options", sa.JSON, nullable=True),
        sa.Column("config_model", sa.String(300), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rollouts_in_progress")
