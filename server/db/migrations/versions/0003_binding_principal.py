"""Backup bindings remember the principal that created them, under a MAC.

Only that principal, within the retry window, gets a binding's data key again
from GetActiveKey. Bindings made before this revision have no principal (""),
so a repeated GetActiveKey for them is refused: the backup role never reads.
The MAC (under the state key) covers who made the binding and when, so that
cannot be changed in the database to hand a data key to someone else.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backup_bindings") as batch_op:
        batch_op.add_column(
            sa.Column("created_by", sa.String(length=256), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("mac", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backup_bindings") as batch_op:
        batch_op.drop_column("mac")
        batch_op.drop_column("created_by")
