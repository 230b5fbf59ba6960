"""Replay requests: what a request needs to be sent again, pinned (body after templates, versions, answer).

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replay_requests",
        sa.Column("trace_id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("route", sa.String(100), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("versions", sa.JSON, nullable=False),
        sa.Column("answer", sa.JSON, nullable=True),
    )
    op.create_index("ix_replay_requests_created_at", "replay_requests", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_replay_requests_created_at", table_name="replay_requests")
    op.drop_table("replay_requests")
