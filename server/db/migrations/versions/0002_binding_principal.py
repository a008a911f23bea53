"""Backup bindings remember the principal that created them.

Only that principal, within the retry window, gets a binding's data key again
from GetActiveKey. Bindings made before this revision have no principal (""),
so a repeated GetActiveKey for them is refused: the backup role never reads.

Revision ID: 0002b
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002b"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backup_bindings") as batch_op:
        batch_op.add_column(
            sa.Column("created_by", sa.String(length=256), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("backup_bindings") as batch_op:
        batch_op.drop_column("created_by")
