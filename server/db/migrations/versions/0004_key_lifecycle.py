"""Key lifecycle: scheduled destruction (a new version state, its due time and requester).

On SQLite a CHECK constraint can only change by rebuilding the table: key_versions is
rebuilt, with foreign keys checked once after the upgrade (server.db.migrate), since keys
and backup_bindings refer to it. audit_events, with its append-only triggers, is untouched.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_OLD_STATES = "state IN ('enabled', 'disabled', 'destroyed')"
_NEW_STATES = (
    "state IN ('enabled', 'disabled', 'pending_approval', 'destroy_scheduled', 'destroyed')"
)
_SCHEDULED_HAS_DUE = "state <> 'destroy_scheduled' OR destroy_due_us IS NOT NULL"


def upgrade() -> None:
    # Plain ADD COLUMN: keys needs no rebuild.
    op.add_column("keys", sa.Column("rotation_period_us", sa.BigInteger(), nullable=True))
    op.add_column("keys", sa.Column("next_rotation_us", sa.BigInteger(), nullable=True))
    op.create_index(op.f("ix_keys_next_rotation_us"), "keys", ["next_rotation_us"])
    with op.batch_alter_table("key_versions", recreate="auto") as batch:
        batch.add_column(sa.Column("destroy_due_us", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("destroy_requested_by", sa.String(length=256), nullable=True))
        batch.add_column(sa.Column("destroy_approved_by", sa.String(length=256), nullable=True))
        batch.alter_column("state", existing_type=sa.String(length=16), type_=sa.String(length=32))
        batch.drop_constraint(op.f("ck_key_versions_state"), type_="check")
        batch.create_check_constraint("state", _NEW_STATES)
        batch.create_check_constraint("scheduled_has_due", _SCHEDULED_HAS_DUE)
        batch.create_index(op.f("ix_key_versions_destroy_due_us"), ["destroy_due_us"])


def downgrade() -> None:
    # A scheduled or pending destruction cannot be expressed in the old schema: disabled.
    op.execute(
        "UPDATE key_versions SET state = 'disabled'"
        " WHERE state IN ('destroy_scheduled', 'pending_approval')"
    )
    with op.batch_alter_table("key_versions", recreate="auto") as batch:
        batch.drop_index(op.f("ix_key_versions_destroy_due_us"))
        batch.drop_constraint(op.f("ck_key_versions_scheduled_has_due"), type_="check")
        batch.drop_constraint(op.f("ck_key_versions_state"), type_="check")
        batch.create_check_constraint("state", _OLD_STATES)
        batch.alter_column("state", existing_type=sa.String(length=32), type_=sa.String(length=16))
        batch.drop_column("destroy_approved_by")
        batch.drop_column("destroy_requested_by")
        batch.drop_column("destroy_due_us")
    op.drop_index(op.f("ix_keys_next_rotation_us"), table_name="keys")
    op.drop_column("keys", "next_rotation_us")
    op.drop_column("keys", "rotation_period_us")
