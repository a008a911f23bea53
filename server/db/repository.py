"""Reads and writes rows inside the caller's transaction; never commits.

`for_update` takes a row lock on PostgreSQL. SQLite has no row locks (and
SQLAlchemy drops FOR UPDATE there): its transactions begin IMMEDIATE instead,
which holds the database's single write lock for the whole transaction.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.models import (
    AuditEventRow,
    AuditHeadRow,
    BackupBindingRow,
    KeyRow,
    KeyVersionRow,
    ServerMetaRow,
)
from server.domain.audit_chain import GENESIS_HASH, HASHED_FIELDS, event_hash
from server.domain.model import AuditEvent, Outcome


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

    def append_audit(
        self,
        *,
        time_us: int,
        actor: str,
        action: str,
        outcome: Outcome,
        status_code: str,
        key_name: str = "",
        version: int = 0,
        from_version: int = 0,
        to_version: int = 0,
        backup_id: str = "",
        reason: str = "",
        detail: str = "",
    ) -> AuditEventRow:
        """Appends one event after the current head, holding the head's lock until commit."""
        head = self._session.scalars(
            select(AuditHeadRow).where(AuditHeadRow.id == 1).with_for_update()
        ).one_or_none()
        if head is None:
            head = AuditHeadRow(id=1, sequence=0, event_hash=GENESIS_HASH)
            self._session.add(head)
        fields: dict[str, object] = {
            "sequence": head.sequence + 1,
            "time_us": time_us,
            "actor": actor,
            "action": action,
            "outcome": str(outcome),
            "status_code": status_code,
            "key_name": key_name,
            "version": version,
            "from_version": from_version,
            "to_version": to_version,
            "backup_id": backup_id,
            "reason": reason,
            "detail": detail,
        }
        assert set(fields) == set(HASHED_FIELDS)
        digest = event_hash(head.event_hash, fields)
        row = AuditEventRow(**fields, previous_hash=head.event_hash, event_hash=digest)
        self._session.add(row)
        head.sequence = row.sequence
        head.event_hash = digest
        self._session.flush()
        return row

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
