"""Rotation by use: each key version counts the data keys it has wrapped.

Versions made before this revision start at 0: how many data keys they wrapped before is not
known (bindings were moved by retirement, and denied or repeated calls wrapped none). A plain
ADD COLUMN with a default, so no table is rebuilt and every row keeps its MAC (the count is
under the MAC only once it is above 0). Going back is refused once a version has counted.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "key_versions",
        sa.Column("data_keys_wrapped", sa.BigInteger(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    # The count is under the MAC of every version that wrapped a data key: without it those
    # rows fail their integrity check, and only the server (which holds the state key)
    # could seal them again. So a database whose versions wrapped data keys stays here.
    counted = (
        op.get_bind()
        .execute(sa.text("SELECT count(*) FROM key_versions WHERE data_keys_wrapped > 0"))
        .scalar_one()
    )
    if counted:
        raise RuntimeError(
            f"cannot downgrade below revision 0005: {counted} key versions count the data "
            "keys they wrapped under their MAC, which the older schema cannot hold; restore "
            "a database backup made before the upgrade instead"
        )
    with op.batch_alter_table("key_versions") as batch:
        batch.drop_column("data_keys_wrapped")
