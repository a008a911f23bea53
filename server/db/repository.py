"""Reads and writes rows inside the caller's transaction; never commits.

`for_update` takes a row lock on PostgreSQL. SQLite has no row locks (and
SQLAlchemy drops FOR UPDATE there): its transactions begin IMMEDIATE instead,
which holds the database's single write lock for the whole transaction.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Row, Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from server.db.models import (
    AuditEventRow,
    AuditHeadRow,
    BackupBindingRow,
    KeyRow,
    KeyVersionRow,
    ServerMetaRow,
)
from server.domain.audit_chain import GENESIS_HASH, event_hash
from server.domain.model import AuditEvent


class Repository:
    def __init__(self, session: Session) -> None:
        self._session = session

    # Keys and versions

    def get_key(self, name: str, *, for_update: bool = False) -> KeyRow | None:
        query = select(KeyRow).where(KeyRow.name == name)
        if for_update:
            query = query.with_for_update()
        return self._session.scalars(query).one_or_none()

    def add_key(self, name: str, created_us: int) -> KeyRow:
        key = KeyRow(name=name, active_version=None, last_version=0, created_us=created_us)
        self._session.add(key)
        self._session.flush()
        return key

    def list_keys(self, after_name: str, limit: int) -> list[tuple[KeyRow, int]]:
        counts = (
            select(KeyVersionRow.key_name, func.count().label("n"))
            .group_by(KeyVersionRow.key_name)
            .subquery()
        )
        rows = self._session.execute(
            select(KeyRow, counts.c.n)
            .join(counts, counts.c.key_name == KeyRow.name)
            .where(KeyRow.name > after_name)
            .order_by(KeyRow.name)
            .limit(limit)
        ).all()
        return [(row[0], int(row[1])) for row in rows]

    def get_version(
        self, key_name: str, version: int, *, for_update: bool = False
    ) -> KeyVersionRow | None:
        query = select(KeyVersionRow).where(
            KeyVersionRow.key_name == key_name, KeyVersionRow.version == version
        )
        if for_update:
            query = query.with_for_update()
        return self._session.scalars(query).one_or_none()

    def add_version(self, row: KeyVersionRow) -> None:
        self._session.add(row)
        self._session.flush()

    def list_versions(self, key_name: str) -> list[KeyVersionRow]:
        return list(
            self._session.scalars(
                select(KeyVersionRow)
                .where(KeyVersionRow.key_name == key_name)
                .order_by(KeyVersionRow.version)
            )
        )

    def flush(self) -> None:
        self._session.flush()

    # Backup bindings

    def get_binding(self, backup_id: str) -> BackupBindingRow | None:
        return self._session.get(BackupBindingRow, backup_id)

    def add_binding(self, row: BackupBindingRow) -> None:
        self._session.add(row)
        self._session.flush()

    # Audit log

    def append_audit(self, **fields: Any) -> int:
        """Appends one event (see `append_audit_events`); returns its sequence number."""
        return self.append_audit_events([fields])[0]

    def append_audit_events(self, events: Sequence[Mapping[str, Any]]) -> list[int]:
        """Appends events after the current head, holding the head's row lock until commit.

        Each mapping has the hashed fields but `sequence`, which the head assigns.
        Returns the sequence numbers, in order.
        """
        if not events:
            return []  # an INSERT with no rows would insert one row of defaults
        connection = self._session.connection()
        sequence, previous = connection.execute(_LOCK_AUDIT_HEAD).one()
        rows = []
        for event in events:
            sequence += 1
            fields = {**_AUDIT_DEFAULTS, **event, "sequence": sequence}
            fields["outcome"] = str(fields["outcome"])
            digest = event_hash(previous, fields)
            rows.append({**fields, "previous_hash": previous, "event_hash": digest})
            previous = digest
        connection.execute(_INSERT_AUDIT_EVENT, rows)
        connection.execute(_MOVE_AUDIT_HEAD, {"head_sequence": sequence, "head_hash": previous})
        return [row["sequence"] for row in rows]

    # Batched look-ups for the data-key hot path: one query per table for a whole batch,
    # on prebuilt Core statements (the ORM costs more than the database here).

    def bindings_by_backup_id(self, backup_ids: Collection[str]) -> list[BoundVersionFacts]:
        """The bindings among these backup ids, each with its version's state and material."""
        ids = {"ids": list(backup_ids)}
        return list(self._session.connection().execute(_BINDINGS_BY_ID, ids))

    def active_versions(self, key_names: Collection[str]) -> list[ActiveVersionFacts]:
        """The keys among these names, each with its active version's state and material."""
        return list(
            self._session.connection().execute(_ACTIVE_VERSIONS, {"names": list(key_names)})
        )

    def add_bindings(self, bindings: Sequence[Mapping[str, Any]]) -> None:
        if bindings:
            self._session.connection().execute(_INSERT_BINDING, list(bindings))

    def list_audit(self, after_sequence: int, limit: int, key_name: str) -> list[AuditEventRow]:
        query = select(AuditEventRow).where(AuditEventRow.sequence > after_sequence)
        if key_name:
            query = query.where(AuditEventRow.key_name == key_name)
        return list(self._session.scalars(query.order_by(AuditEventRow.sequence).limit(limit)))

    def audit_head(self) -> tuple[int, str]:
        head = self._session.get(AuditHeadRow, 1)
        return (head.sequence, head.event_hash) if head else (0, GENESIS_HASH)

    def iter_audit(self, batch_size: int = 1000) -> Iterator[AuditEvent]:
        result = self._session.execute(
            select(AuditEventRow)
            .order_by(AuditEventRow.sequence)
            .execution_options(yield_per=batch_size)
        )
        for row in result.scalars():
            yield audit_event_from_row(row)

    # Deployment facts

    def get_meta(self, name: str) -> bytes | None:
        row = self._session.get(ServerMetaRow, name)
        return row.value if row else None

    def set_meta(self, name: str, value: bytes) -> None:
        self._session.merge(ServerMetaRow(name=name, value=value))


_bindings = cast(Table, BackupBindingRow.__table__)
_versions = cast(Table, KeyVersionRow.__table__)
_keys = cast(Table, KeyRow.__table__)
_audit_head = cast(Table, AuditHeadRow.__table__)
_BINDINGS_BY_ID = (
    select(
        _bindings.c.backup_id,
        _bindings.c.key_name,
        _bindings.c.version,
        _bindings.c.wrapped_data_key,
        _versions.c.state,
        _versions.c.wrapped_material,
    )
    .join(
        _versions,
        (_versions.c.key_name == _bindings.c.key_name)
        & (_versions.c.version == _bindings.c.version),
    )
    .where(_bindings.c.backup_id.in_(bindparam("ids", expanding=True)))
)
_ACTIVE_VERSIONS = (
    select(
        _keys.c.name,
        _keys.c.active_version,
        _versions.c.state,
        _versions.c.wrapped_material,
    )
    .outerjoin(
        _versions,
        (_versions.c.key_name == _keys.c.name) & (_versions.c.version == _keys.c.active_version),
    )
    .where(_keys.c.name.in_(bindparam("names", expanding=True)))
)
_INSERT_BINDING = insert(_bindings)
_LOCK_AUDIT_HEAD = (
    select(_audit_head.c.sequence, _audit_head.c.event_hash)
    .where(_audit_head.c.id == 1)
    .with_for_update()
)
_INSERT_AUDIT_EVENT = insert(cast(Table, AuditEventRow.__table__))
_MOVE_AUDIT_HEAD = (
    update(_audit_head)
    .where(_audit_head.c.id == 1)
    .values(sequence=bindparam("head_sequence"), event_hash=bindparam("head_hash"))
)

# Result rows of the batched look-ups, read by attribute (row.version, row.state...):
# backup_id, key_name, version, wrapped_data_key, state, wrapped_material
BoundVersionFacts = Row[str, str, int, bytes, str, bytes | None]
# name, active_version, state, wrapped_material (the last two None without an active version)
ActiveVersionFacts = Row[str, int | None, str | None, bytes | None]

# What an audit event says when a field does not concern it.
_AUDIT_DEFAULTS: dict[str, Any] = {
    "key_name": "",
    "version": 0,
    "from_version": 0,
    "to_version": 0,
    "backup_id": "",
    "reason": "",
    "detail": "",
}


def audit_event_from_row(row: AuditEventRow) -> AuditEvent:
    return AuditEvent(
        sequence=row.sequence,
        time_us=row.time_us,
        actor=row.actor,
        action=row.action,
        outcome=row.outcome,
        status_code=row.status_code,
        key_name=row.key_name,
        version=row.version,
        from_version=row.from_version,
        to_version=row.to_version,
        backup_id=row.backup_id,
        reason=row.reason,
        detail=row.detail,
        previous_hash=row.previous_hash,
        event_hash=row.event_hash,
    )
