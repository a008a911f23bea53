"""Reads and writes rows inside the caller's transaction; never commits.

`for_update` takes a row lock on PostgreSQL. SQLite has no row locks (and
SQLAlchemy drops FOR UPDATE there): its transactions begin IMMEDIATE instead,
which holds the database's single write lock for the whole transaction.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.driver import SessionStatements, StatementRunner
from server.db.models import (
    AuditEventRow,
    AuditHeadRow,
    BackupBindingRow,
    KeyRow,
    KeyVersionRow,
    ServerMetaRow,
)
from server.domain.audit_chain import GENESIS_HASH, HASHED_FIELDS, event_hash
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
        """Appends events after the current head (see `DataKeyStore.append_audit_events`)."""
        return DataKeyStore(SessionStatements(self._session)).append_audit_events(events)

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


class DataKeyStore:
    """The data-key hot path: one statement per table for a whole batch of calls.

    SQL text in the driver's parameter style, run through a `StatementRunner`
    (compiling SQLAlchemy statements costs more than the database spends on them).
    Runs inside the caller's transaction; never commits.
    """

    def __init__(self, statements: StatementRunner) -> None:
        self._run = statements
        sql = _DRIVER_SQL.get(statements.dialect_name)
        if sql is None:
            sql = _DRIVER_SQL[statements.dialect_name] = _DriverSql(statements.dialect_name)
        self._sql = sql

    def bindings_by_backup_id(self, backup_ids: Collection[str]) -> list[BoundVersionFacts]:
        """The bindings among these backup ids, each with its version's state and material."""
        rows = self._run.rows(self._sql.bindings_by_id(len(backup_ids)), tuple(backup_ids))
        return [BoundVersionFacts(*row) for row in rows]

    def active_versions(self, key_names: Collection[str]) -> list[ActiveVersionFacts]:
        """The keys among these names, each with its active version's state and material."""
        rows = self._run.rows(self._sql.active_versions(len(key_names)), tuple(key_names))
        return [ActiveVersionFacts(*row) for row in rows]

    def add_bindings(self, bindings: Sequence[Mapping[str, Any]]) -> None:
        if bindings:
            rows = [tuple(binding[column] for column in _BINDING_COLUMNS) for binding in bindings]
            self._insert_rows("backup_bindings", _BINDING_COLUMNS, rows)

    def append_audit_events(self, events: Sequence[Mapping[str, Any]]) -> list[int]:
        """Appends events after the current head, holding the head's row lock until commit.

        Each mapping has the hashed fields but `sequence`, which the head assigns.
        Returns the sequence numbers, in order.
        """
        if not events:
            return []
        ((sequence, previous),) = self._run.rows(self._sql.lock_audit_head, ())
        rows = []
        for event in events:
            sequence += 1
            fields = {**_AUDIT_DEFAULTS, **event, "sequence": sequence}
            fields["outcome"] = str(fields["outcome"])
            digest = event_hash(previous, fields)
            fields["previous_hash"], fields["event_hash"] = previous, digest
            rows.append(tuple(fields[column] for column in _AUDIT_COLUMNS))
            previous = digest
        self._insert_rows("audit_events", _AUDIT_COLUMNS, rows)
        self._run.run(self._sql.move_audit_head, (sequence, previous))
        return [row[0] for row in rows]

    def _insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """Multi-row INSERTs of 64, 32, ... 1 rows: a batch of n rows takes at most
        log2(n) + 1 statements instead of n (SQLite releases the GIL for each, and getting
        it back is what costs in a busy server), from at most 7 texts per table."""
        start = 0
        while start < len(rows):
            count = min(MAX_ROWS_PER_INSERT, 1 << ((len(rows) - start).bit_length() - 1))
            chunk = rows[start : start + count]
            sql = self._sql.insert(table, columns, count)
            self._run.run(sql, [value for row in chunk for value in row])
            start += count


_AUDIT_COLUMNS = (*HASHED_FIELDS, "previous_hash", "event_hash")
_BINDING_COLUMNS = (
    "backup_id",
    "key_name",
    "version",
    "wrapped_data_key",
    "created_us",
    "recovered",
    "created_by",
)


# 64 audit rows are 1,088 parameters: far below SQLite's and PostgreSQL's limits.
MAX_ROWS_PER_INSERT = 64


class _DriverSql:
    """The hot path's statements in the driver's own parameter style (sqlite3 `?`, psycopg `%s`)."""

    def __init__(self, dialect_name: str) -> None:
        self.mark = "?" if dialect_name == "sqlite" else "%s"
        # SQLite has no row locks: its transaction already holds the database's write lock.
        lock = " FOR UPDATE" if dialect_name == "postgresql" else ""
        self.lock_audit_head = f"SELECT sequence, event_hash FROM audit_head WHERE id = 1{lock}"
        self.move_audit_head = (
            f"UPDATE audit_head SET sequence = {self.mark}, event_hash = {self.mark} WHERE id = 1"
        )
        self._inserts: dict[tuple[str, int], str] = {}

    def insert(self, table: str, columns: Sequence[str], count: int) -> str:
        """INSERT INTO table (columns) VALUES (...), (...): `count` rows."""
        sql = self._inserts.get((table, count))
        if sql is None:
            row = f"({self._marks(len(columns))})"
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([row] * count)}"
            self._inserts[(table, count)] = sql
        return sql

    def _marks(self, count: int) -> str:
        return ", ".join([self.mark] * count)

    def bindings_by_id(self, count: int) -> str:
        return (
            "SELECT b.backup_id, b.key_name, b.version, b.wrapped_data_key,"
            " v.state, v.wrapped_material, b.created_by, b.created_us"
            " FROM backup_bindings b JOIN key_versions v"
            " ON v.key_name = b.key_name AND v.version = b.version"
            f" WHERE b.backup_id IN ({self._marks(count)})"
        )

    def active_versions(self, count: int) -> str:
        return (
            "SELECT k.name, k.active_version, v.state, v.wrapped_material"
            " FROM keys k LEFT JOIN key_versions v"
            " ON v.key_name = k.name AND v.version = k.active_version"
            f" WHERE k.name IN ({self._marks(count)})"
        )


_DRIVER_SQL: dict[str, _DriverSql] = {}


class BoundVersionFacts(NamedTuple):
    """A backup's binding with its version's state and wrapped material."""

    backup_id: str
    key_name: str
    version: int
    wrapped_data_key: bytes
    state: str
    wrapped_material: bytes | None
    created_by: str
    created_us: int


class ActiveVersionFacts(NamedTuple):
    """A key with its active version (state and material None when it has none)."""

    name: str
    active_version: int | None
    state: str | None
    wrapped_material: bytes | None


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
