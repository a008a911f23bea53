"""Keyed audit chain and authenticated state: MAC columns on events, head, keys, versions.

Existing events keep no MAC: the first server start after this revision makes the
audit and state keys, seals every key and version row and writes the event that
starts the keyed chain, anchored on the old head (its previous_hash).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_MAC_TABLES = ("audit_events", "audit_head", "keys", "key_versions")
_STATE_TABLES = ("keys", "key_versions")


def upgrade() -> None:
    for table in _STATE_TABLES:
        op.add_column(table, sa.Column("state_sequence", sa.BigInteger(), nullable=True))
    for table in _MAC_TABLES:
        op.add_column(table, sa.Column("mac", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+): a batch rebuild would drop the append-only triggers.
    for table in _MAC_TABLES:
        op.drop_column(table, "mac")
    for table in _STATE_TABLES:
        op.drop_column(table, "state_sequence")
