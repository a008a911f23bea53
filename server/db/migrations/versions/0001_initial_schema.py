"""Initial schema: keys, key versions, backup bindings, the append-only audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APPEND_ONLY_MESSAGE = "audit_events is append-only"


def upgrade() -> None:
    op.create_table(
        "keys",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("active_version", sa.Integer(), nullable=True),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "active_version IS NULL OR active_version <= last_version", name=op.f("ck_keys_active")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_keys")),
    )
    op.create_table(
        "key_versions",
        sa.Column("key_name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("wrapped_material", sa.LargeBinary(), nullable=True),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("destroyed_us", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "(state = 'destroyed') = (wrapped_material IS NULL)",
            name=op.f("ck_key_versions_destroyed_means_erased"),
        ),
        sa.CheckConstraint(
            "origin IN ('generated', 'imported')", name=op.f("ck_key_versions_origin")
        ),
        sa.CheckConstraint(
            "state IN ('enabled', 'disabled', 'destroyed')", name=op.f("ck_key_versions_state")
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_key_versions_version_positive")),
        sa.ForeignKeyConstraint(
            ["key_name"], ["keys.name"], name=op.f("fk_key_versions_key_name_keys")
        ),
        sa.PrimaryKeyConstraint("key_name", "version", name=op.f("pk_key_versions")),
    )
    # The active version must be a version of the same key: added once both tables exist.
    with op.batch_alter_table("keys") as batch_op:
        batch_op.create_foreign_key(
            "fk_keys_active_version",
            "key_versions",
            ["name", "active_version"],
            ["key_name", "version"],
        )
    op.create_table(
        "backup_bindings",
        sa.Column("backup_id", sa.String(length=128), nullable=False),
        sa.Column("key_name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("wrapped_data_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("recovered", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_name", "version"],
            ["key_versions.key_name", "key_versions.version"],
            name=op.f("fk_backup_bindings_key_name_version_key_versions"),
        ),
        sa.PrimaryKeyConstraint("backup_id", name=op.f("pk_backup_bindings")),
    )
    op.create_index(
        op.f("ix_backup_bindings_key_name_version"), "backup_bindings", ["key_name", "version"]
    )
    op.create_table(
        "audit_events",
        sa.Column("sequence", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("time_us", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("status_code", sa.String(length=32), nullable=False),
        sa.Column("key_name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=False),
        sa.Column("to_version", sa.Integer(), nullable=False),
        sa.Column("backup_id", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("previous_hash", sa.String(length=64), nullable=False),
        sa.Column("event_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("sequence", name=op.f("pk_audit_events")),
    )
    op.create_index(
        op.f("ix_audit_events_key_name_sequence"), "audit_events", ["key_name", "sequence"]
    )
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("event_hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_head_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    op.execute(f"INSERT INTO audit_head (id, sequence, event_hash) VALUES (1, 0, '{'0' * 64}')")
    op.create_table(
        "server_meta",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_server_meta")),
    )
    _create_append_only_triggers()


def _create_append_only_triggers() -> None:
    """The database itself refuses to edit or delete audit rows."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()"
        )
    else:
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_events_no_{event.lower()} BEFORE {event} ON audit_events "
                f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_events_no_truncate ON audit_events")
        op.execute("DROP TRIGGER audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION audit_events_append_only()")
    else:
        op.execute("DROP TRIGGER audit_events_no_update")
        op.execute("DROP TRIGGER audit_events_no_delete")
    op.drop_table("server_meta")
    op.drop_table("audit_head")
    op.drop_index(op.f("ix_audit_events_key_name_sequence"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index(op.f("ix_backup_bindings_key_name_version"), table_name="backup_bindings")
    op.drop_table("backup_bindings")
    with op.batch_alter_table("keys") as batch_op:
        batch_op.drop_constraint("fk_keys_active_version", type_="foreignkey")
    op.drop_table("key_versions")
    op.drop_table("keys")
