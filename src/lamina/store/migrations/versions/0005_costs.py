"""Costs: budget spend per scope and period (reservations included), and the ledger of settled calls.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budget_spend",
        sa.Column("scope", sa.String(140), primary_key=True),
        sa.Column("period_start", sa.BigInteger, primary_key=True),
        sa.Column("spent_nusd", sa.BigInteger, nullable=False),
        sa.Column("reserved_nusd", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "cost_ledger",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=True),
        sa.Column("key_id", sa.String(100), nullable=True),
        sa.Column("key_name", sa.String(100), nullable=False),
        sa.Column("operation", sa.String(40), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("deployment", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(300), nullable=True),
        sa.Column("replica", sa.String(200), nullable=True),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("engine_s", sa.Float, nullable=True),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("basis", sa.String(10), nullable=False),
    )
    op.create_index("ix_cost_ledger_ts", "cost_ledger", ["ts"])
    op.create_index("ix_cost_ledger_key_id_ts", "cost_ledger", ["key_id", "ts"])


def downgrade() -> None:
    op.drop_table("cost_ledger")
    op.drop_table("budget_spend")
