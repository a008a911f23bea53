"""The schema. Alembic migrations in `server/db/migrations` create and change it.

Times are integer microseconds since the epoch (UTC), so audit hashes are
computed over exactly the same values on every backend.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class KeyRow(Base):
    """A named key. `active_version` is one column, so a key has at most one active version."""

    __tablename__ = "keys"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    active_version: Mapped[int | None] = mapped_column(Integer)
    last_version: Mapped[int] = mapped_column(Integer)
    created_us: Mapped[int] = mapped_column(BigInteger)
    # Automatic rotation: its period and when it is next due (both NULL: off).
    rotation_period_us: Mapped[int | None] = mapped_column(BigInteger)
    next_rotation_us: Mapped[int | None] = mapped_column(BigInteger, index=True)
    # The audit event that last changed the row, and the row's MAC under the state key
    # (server.domain.integrity): NULL only in a database the keyed server has not opened yet.
    state_sequence: Mapped[int | None] = mapped_column(BigInteger)
    mac: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        ForeignKeyConstraint(
            ["name", "active_version"],
            ["key_versions.key_name", "key_versions.version"],
            name="fk_keys_active_version",
            use_alter=True,
        ),
        CheckConstraint("active_version IS NULL OR active_version <= last_version", "active"),
    )


STATE_CHECK = (
    "state IN ('enabled', 'disabled', 'pending_approval', 'destroy_scheduled', 'destroyed')"
)


class KeyVersionRow(Base):
    __tablename__ = "key_versions"

    key_name: Mapped[str] = mapped_column(ForeignKey("keys.name"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(32))
    origin: Mapped[str] = mapped_column(String(16))
    # Erased (NULL) exactly when the version is destroyed: crypto-shredding.
    wrapped_material: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_us: Mapped[int] = mapped_column(BigInteger)
    destroyed_us: Mapped[int | None] = mapped_column(BigInteger)
    # Set while a destruction is scheduled (and kept once carried out): when it falls due,
    # and the admin who asked for it. Both under the row's MAC.
    destroy_due_us: Mapped[int | None] = mapped_column(BigInteger)
    destroy_requested_by: Mapped[str | None] = mapped_column(String(256))
    destroy_approved_by: Mapped[str | None] = mapped_column(String(256))  # the second admin
    # How many data keys this version's material has wrapped (AES-GCM with random nonces must
    # stay well below 2^32 per key): the key is rotated before it reaches the server's
    # --max-data-keys-per-version. Under the row's MAC.
    data_keys_wrapped: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    state_sequence: Mapped[int | None] = mapped_column(BigInteger)  # as on KeyRow
    mac: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint(STATE_CHECK, "state"),
        CheckConstraint(
            "state <> 'destroy_scheduled' OR destroy_due_us IS NOT NULL", "scheduled_has_due"
        ),
        CheckConstraint("origin IN ('generated', 'imported')", "origin"),
        CheckConstraint(
            "(state = 'destroyed') = (wrapped_material IS NULL)", "destroyed_means_erased"
        ),
        CheckConstraint("version >= 1", "version_positive"),
        # The scheduler's search for due destructions.
        Index(None, "destroy_due_us"),
    )


class BackupBindingRow(Base):
    """Which key version a backup was made with, and its data key wrapped under that version."""

    __tablename__ = "backup_bindings"

    backup_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    key_name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    wrapped_data_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_us: Mapped[int] = mapped_column(BigInteger)
    recovered: Mapped[bool] = mapped_column(Boolean, default=False)
    # The principal whose call made the binding: only it may get the data key again.
    created_by: Mapped[str] = mapped_column(String(256), default="", server_default="")
    # MAC under the state key over who made it and when (server.domain.integrity); NULL
    # only for bindings made before it existed, which have no principal either.
    mac: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        ForeignKeyConstraint(
            ["key_name", "version"], ["key_versions.key_name", "key_versions.version"]
        ),
        Index(None, "key_name", "version"),
    )


class AuditEventRow(Base):
    """Append-only (database triggers refuse UPDATE and DELETE); hash-chained."""

    __tablename__ = "audit_events"

    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    time_us: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[str] = mapped_column(String(32))
    key_name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    from_version: Mapped[int] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer)
    backup_id: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text)
    previous_hash: Mapped[str] = mapped_column(String(64))
    event_hash: Mapped[str] = mapped_column(String(64))
    # HMAC under the audit MAC key; NULL only for events older than the keyed chain.
    mac: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index(None, "key_name", "sequence"),)


class AuditHeadRow(Base):
    """The single row naming the newest audit event; writers lock it to append in one line."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sequence: Mapped[int] = mapped_column(BigInteger)
    event_hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (CheckConstraint("id = 1", "single_row"),)


class ServerMetaRow(Base):
    """Facts about the deployment, such as the check value of the root key."""

    __tablename__ = "server_meta"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
