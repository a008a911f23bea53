"""Reads and writes rows inside the caller's transaction; never commits.

`for_update` takes a row lock on PostgreSQL. SQLite has no row locks (and
SQLAlchemy drops FOR UPDATE there): its transactions begin IMMEDIATE instead,
which holds the database's single write lock for the whole transaction.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Row, func, insert, select, tuple_, update
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
        head = self._session.execute(
            select(AuditHeadRow.sequence, AuditHeadRow.event_hash)
            .where(AuditHeadRow.id == 1)
            .with_for_update()
        ).one()
        sequence, previous = head.sequence, head.event_hash
        rows = []
        for event in events:
            sequence += 1
            fields = {**_AUDIT_DEFAULTS, **event, "sequence": sequence}
            fields["outcome"] = str(fields["outcome"])
            digest = event_hash(previous, fields)
            rows.append({**fields, "previous_hash": previous, "event_hash": digest})
            previous = digest
        self._session.execute(insert(AuditEventRow), rows)
        self._session.execute(
            update(AuditHeadRow)
            .where(AuditHeadRow.id == 1)
            .values(sequence=sequence, event_hash=previous)
        )
        return [row["sequence"] for row in rows]

    # Batched look-ups for the data-key hot path: one query per table for a whole batch.

    def bindings_by_backup_id(self, backup_ids: Collection[str]) -> dict[str, BindingFacts]:
        rows = self._session.execute(
            select(
                BackupBindingRow.backup_id,
                BackupBindingRow.key_name,
                BackupBindingRow.version,
                BackupBindingRow.wrapped_data_key,
            ).where(BackupBindingRow.backup_id.in_(backup_ids))
        )
        return {row.backup_id: row for row in rows}

    def active_versions(self, key_names: Collection[str]) -> dict[str, int | None]:
        rows = self._session.execute(
            select(KeyRow.name, KeyRow.active_version).where(KeyRow.name.in_(key_names))
        )
        return {row.name: row.active_version for row in rows}

    def versions_by_pair(
        self, pairs: Collection[tuple[str, int]]
    ) -> dict[tuple[str, int], VersionFacts]:
        if not pairs:
            return {}
        rows = self._session.execute(
            select(
                KeyVersionRow.key_name,
                KeyVersionRow.version,
                KeyVersionRow.state,
                KeyVersionRow.wrapped_material,
            ).where(tuple_(KeyVersionRow.key_name, KeyVersionRow.version).in_(list(pairs)))
        )
        return {(row.key_name, row.version): row for row in rows}

    def add_bindings(self, bindings: Sequence[Mapping[str, Any]]) -> None:
        if bindings:
            self._session.execute(insert(BackupBindingRow), list(bindings))

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


# Result rows of the batched look-ups, read by attribute (row.version, row.state...).
BindingFacts = Row[str, str, int, bytes]  # backup_id, key_name, version, wrapped_data_key
VersionFacts = Row[str, int, str, bytes | None]  # key_name, version, state, wrapped_material

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
