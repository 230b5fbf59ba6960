"""Rollouts: no schema change. A finished rollout stores its new version in the ``deployments`` row (its
``model`` and ``options``), so a restart serves it; this revision keeps the migration chain.

Revision ID: 0013
Revises: 0012
"""

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing to change: see the module docstring."""


def downgrade() -> None:
    """Nothing to change: see the module docstring."""
