"""Rollouts of config deployments: the version a rollout moved a deployment of the config file to, kept
beside the config (which stays the record of what it names).

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "config_rollouts",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("config_model", sa.String(300), nullable=False),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("config_rollouts")
