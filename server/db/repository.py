"""Reads and writes rows inside the caller's transaction; never commits.

`for_update` takes a row lock on PostgreSQL. SQLite has no row locks (and
SQLAlchemy drops FOR UPDATE there): its transactions begin IMMEDIATE instead,
which holds the database's single write lock for the whole transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
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
from server.domain.integrity import AuditMac, SealedBinding, SealedKey, SealedVersion, StateSeal
from server.domain.model import AuditEvent, AuditHead


@dataclass(frozen=True)
class Integrity:
    """What every write of the log and of the state needs: the audit MAC, the state seal,
    and the external audit sink (told each event before its transaction commits)."""

    audit: AuditMac
    state: StateSeal
    sink: Callable[[Sequence[Mapping[str, Any]]], None] | None = None


class MetaStore:
    """Deployment facts and the audit head: all that start-up needs before the server's
    keys are open (`server.keystore.server_keys`)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def get_meta(self, name: str) -> bytes | None:
        row = self._session.get(ServerMetaRow, name)
        return row.value if row else None

    def set_meta(self, name: str, value: bytes) -> None:
        self._session.merge(ServerMetaRow(name=name, value=value))

    def audit_head(self) -> AuditHead:
        head = self._session.get(AuditHeadRow, 1)
        if head is None:
            return AuditHead(0, GENESIS_HASH, None)
        return AuditHead(head.sequence, head.event_hash, head.mac)

    def any_keyed_audit_event(self) -> bool:
        query = select(AuditEventRow.sequence).where(AuditEventRow.mac.is_not(None)).limit(1)
        return self._session.scalars(query).first() is not None


class Repository(MetaStore):
    """Every key and version row it returns has passed its MAC check (`Integrity.state`)."""

    def __init__(self, session: Session, integrity: Integrity) -> None:
        super().__init__(session)
        self._integrity = integrity
        self.last_audit_sequence = 0  # of the newest event this transaction appended
        # Rows checked (or created) in this transaction: their later changes are ours.
        self._trusted: set[KeyRow | KeyVersionRow] = set()

    # Keys and versions

    def get_key(self, name: str, *, for_update: bool = False) -> KeyRow | None:
        query = select(KeyRow).where(KeyRow.name == name)
        if for_update:
            query = query.with_for_update()
        return self._checked_key(self._session.scalars(query).one_or_none())

    def _checked_key(self, row: KeyRow | None) -> KeyRow | None:
        if row is not None and row not in self._trusted:
            self._integrity.state.check(sealed_key(row), row.mac)
            self._trusted.add(row)
        return row

    def _checked_version(self, row: KeyVersionRow | None) -> KeyVersionRow | None:
        if row is not None and row not in self._trusted:
            self._integrity.state.check(sealed_version(row), row.mac)
            self._trusted.add(row)
        return row

    def seal_changed_state(self) -> int:
        """Re-MACs every key and version row this transaction created or changed, naming the
        transaction's audit event as the one that last changed it; returns how many.

        Called after the use case appended its event: a state change without one is a bug.
        """
        changed = [row for row in self._trusted if row.mac != self._mac_of(row)]
        if changed and not self.last_audit_sequence:
            raise RuntimeError("state changed without an audit event in the same transaction")
        for row in changed:
            row.state_sequence = self.last_audit_sequence
            row.mac = self._mac_of(row)
        self._session.flush()
        return len(changed)

    def _mac_of(self, row: KeyRow | KeyVersionRow) -> str:
        seal = self._integrity.state
        if isinstance(row, KeyRow):
            return seal.key_mac(sealed_key(row))
        return seal.version_mac(sealed_version(row))

    def seal_all_state(self, sequence: int) -> tuple[int, int]:
        """Seals every key and version row as last changed by event `sequence` (once, when the
        state key is made); returns the counts."""
        keys = list(self._session.scalars(select(KeyRow)))
        versions = list(self._session.scalars(select(KeyVersionRow)))
        rows: list[KeyRow | KeyVersionRow] = [*keys, *versions]
        for row in rows:
            row.state_sequence = sequence
            row.mac = self._mac_of(row)
        self._session.flush()
        return len(keys), len(versions)

    def add_key(self, name: str, created_us: int) -> KeyRow:
        key = KeyRow(name=name, active_version=None, last_version=0, created_us=created_us)
        self._session.add(key)
        self._session.flush()
        self._trusted.add(key)
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
        return [(self._checked(row[0]), int(row[1])) for row in rows]

    def _checked(self, row: KeyRow) -> KeyRow:
        self._checked_key(row)
        return row

    def get_version(
        self, key_name: str, version: int, *, for_update: bool = False
    ) -> KeyVersionRow | None:
        query = select(KeyVersionRow).where(
            KeyVersionRow.key_name == key_name, KeyVersionRow.version == version
        )
        if for_update:
            query = query.with_for_update()
        return self._checked_version(self._session.scalars(query).one_or_none())

    def add_version(self, row: KeyVersionRow) -> None:
        self._session.add(row)
        self._session.flush()
        self._trusted.add(row)

    def list_versions(self, key_name: str) -> list[KeyVersionRow]:
        rows = self._session.scalars(
            select(KeyVersionRow)
            .where(KeyVersionRow.key_name == key_name)
            .order_by(KeyVersionRow.version)
        )
        return [row for row in rows if self._checked_version(row)]

    def all_state(self) -> tuple[list[KeyRow], list[KeyVersionRow]]:
        """Every key and version row, unchecked: for `VerifyAuditLog`, which reports each."""
        keys = list(self._session.scalars(select(KeyRow).order_by(KeyRow.name)))
        versions = list(
            self._session.scalars(
                select(KeyVersionRow).order_by(KeyVersionRow.key_name, KeyVersionRow.version)
            )
        )
        return keys, versions

    def due_destructions(self, now_us: int, limit: int) -> list[tuple[str, int]]:
        """Scheduled destructions due by `now_us`, unchecked (each is re-read under lock)."""
        query = (
            select(KeyVersionRow.key_name, KeyVersionRow.version)
            .where(
                KeyVersionRow.destroy_due_us <= now_us,
                KeyVersionRow.state == "destroy_scheduled",
            )
            .order_by(KeyVersionRow.destroy_due_us)
            .limit(limit)
        )
        return [(row[0], row[1]) for row in self._session.execute(query)]

    def due_rotations(self, now_us: int, limit: int) -> list[str]:
        """Keys whose automatic rotation is due by `now_us`, unchecked (re-read under lock)."""
        query = (
            select(KeyRow.name)
            .where(KeyRow.next_rotation_us <= now_us)
            .order_by(KeyRow.next_rotation_us)
            .limit(limit)
        )
        return list(self._session.scalars(query))

    def next_due(self) -> int | None:
        """The earliest scheduled destruction or automatic rotation, if any (both on indexes)."""
        destruction = self._session.scalar(
            select(func.min(KeyVersionRow.destroy_due_us)).where(
                KeyVersionRow.state == "destroy_scheduled"
            )
        )
        rotation = self._session.scalar(select(func.min(KeyRow.next_rotation_us)))
        due = [time for time in (destruction, rotation) if time is not None]
        return min(due) if due else None

    def flush(self) -> None:
        self._session.flush()

    # Backup bindings

    def get_binding(self, backup_id: str) -> BackupBindingRow | None:
        return self._session.get(BackupBindingRow, backup_id)

    def reseal_binding(self, row: BackupBindingRow) -> None:
        """A binding the server changed (retired to another version) under its new MAC."""
        row.mac = self._integrity.state.binding_mac(sealed_binding(row))

    def add_binding(self, row: BackupBindingRow) -> None:
        """Adds a binding under its MAC (see `sealed_binding`)."""
        row.mac = self._integrity.state.binding_mac(sealed_binding(row))
        self._session.add(row)
        self._session.flush()

    def backup_counts(self, key_name: str) -> dict[int, int]:
        """How many backups are bound to each version of the key (on the (key, version) index)."""
        query = (
            select(BackupBindingRow.version, func.count())
            .where(BackupBindingRow.key_name == key_name)
            .group_by(BackupBindingRow.version)
        )
        return {int(row[0]): int(row[1]) for row in self._session.execute(query)}

    def backup_count(self, key_name: str, version: int) -> int:
        query = select(func.count()).where(
            BackupBindingRow.key_name == key_name, BackupBindingRow.version == version
        )
        return int(self._session.scalar(query) or 0)

    def bindings_to_rewrap(self, key_name: str, version: int, limit: int) -> list[BackupBindingRow]:
        """Up to `limit` bindings of the version, locked (PostgreSQL) for the rewrap."""
        query = (
            select(BackupBindingRow)
            .where(BackupBindingRow.key_name == key_name, BackupBindingRow.version == version)
            .order_by(BackupBindingRow.backup_id)
            .limit(limit)
            .with_for_update()
        )
        return list(self._session.scalars(query))

    def list_bindings(
        self, key_name: str, version: int, after_backup_id: str, limit: int
    ) -> list[BackupBindingRow]:
        """Bindings of the key (of one version unless `version` is 0), by backup id."""
        query = select(BackupBindingRow).where(
            BackupBindingRow.key_name == key_name, BackupBindingRow.backup_id > after_backup_id
        )
        if version:
            query = query.where(BackupBindingRow.version == version)
        return list(self._session.scalars(query.order_by(BackupBindingRow.backup_id).limit(limit)))

    # Audit log

    def append_audit(self, **fields: Any) -> int:
        """Appends one event (see `append_audit_events`); returns its sequence number."""
        return self.append_audit_events([fields])[0]

    def append_audit_events(self, events: Sequence[Mapping[str, Any]]) -> list[int]:
        """Appends events after the current head (see `DataKeyStore.append_audit_events`)."""
        store = DataKeyStore(SessionStatements(self._session), self._integrity)
        sequences = store.append_audit_events(events)
        if sequences:
            self.last_audit_sequence = sequences[-1]
        return sequences

    def list_audit(self, after_sequence: int, limit: int, key_name: str) -> list[AuditEventRow]:
        query = select(AuditEventRow).where(AuditEventRow.sequence > after_sequence)
        if key_name:
            query = query.where(AuditEventRow.key_name == key_name)
        return list(self._session.scalars(query.order_by(AuditEventRow.sequence).limit(limit)))

    def audit_event(self, sequence: int) -> AuditEvent | None:
        row = self._session.get(AuditEventRow, sequence)
        return audit_event_from_row(row) if row else None

    def iter_audit(self, batch_size: int = 1000) -> Iterator[AuditEvent]:
        result = self._session.execute(
            select(AuditEventRow)
            .order_by(AuditEventRow.sequence)
            .execution_options(yield_per=batch_size)
        )
        for row in result.scalars():
            yield audit_event_from_row(row)


class DataKeyStore:
    """The data-key hot path: one statement per table for a whole batch of calls.

    SQL text in the driver's parameter style, run through a `StatementRunner`
    (compiling SQLAlchemy statements costs more than the database spends on them).
    Runs inside the caller's transaction; never commits.
    """

    def __init__(self, statements: StatementRunner, integrity: Integrity) -> None:
        self._run = statements
        self._integrity = integrity
        sql = _DRIVER_SQL.get(statements.dialect_name)
        if sql is None:
            sql = _DRIVER_SQL[statements.dialect_name] = _DriverSql(statements.dialect_name)
        self._sql = sql

    def bindings_by_backup_id(self, backup_ids: Collection[str]) -> list[BoundVersionFacts]:
        """The bindings among these backup ids, each with its version's state and material."""
        rows = self._run.rows(self._sql.bindings_by_id(len(backup_ids)), tuple(backup_ids))
        return [BoundVersionFacts.from_row(row) for row in rows]

    def active_versions(self, key_names: Collection[str]) -> list[ActiveVersionFacts]:
        """The keys among these names, each with its active version's state and material."""
        rows = self._run.rows(self._sql.active_versions(len(key_names)), tuple(key_names))
        return [ActiveVersionFacts.from_row(row) for row in rows]

    def lock_version(
        self, key_name: str, version: int, as_read: VersionFacts
    ) -> VersionFacts | None:
        """A version's facts as they are now, its row locked until commit, its MAC checked.

        On SQLite what the batch read (`as_read`, checked then) is current: its transaction
        has held the database's write lock since BEGIN IMMEDIATE. PostgreSQL reads it again
        under a row lock, since other replicas may have changed it since.
        """
        if self._run.dialect_name == "sqlite":
            return as_read
        rows = self._run.rows(self._sql.lock_version, (key_name, version))
        if not rows:
            return None
        facts = VersionFacts(*rows[0])
        self._integrity.state.check(facts.sealed(key_name, version), facts.mac)
        return facts

    def count_wrapped(
        self, key_name: str, version: int, facts: VersionFacts, wrapped: int, sequence: int
    ) -> None:
        """Adds `wrapped` to a locked version's count of wrapped data keys, naming audit event
        `sequence` as its last change, under a new MAC."""
        changed = facts._replace(
            data_keys_wrapped=facts.data_keys_wrapped + wrapped, state_sequence=sequence
        )
        mac = self._integrity.state.seal(changed.sealed(key_name, version))
        self._run.run(
            self._sql.count_wrapped,
            (changed.data_keys_wrapped, sequence, mac, key_name, version),
        )

    def add_bindings(self, bindings: Sequence[Mapping[str, Any]]) -> None:
        """Inserts bindings, each under its MAC (the columns of `_BINDING_COLUMNS` but `mac`)."""
        if not bindings:
            return
        seal = self._integrity.state
        rows = []
        for binding in bindings:
            mac = seal.binding_mac(
                SealedBinding(
                    binding["backup_id"],
                    binding["key_name"],
                    binding["version"],
                    binding["created_by"],
                    binding["created_us"],
                    bool(binding["recovered"]),
                )
            )
            rows.append((*(binding[column] for column in _BINDING_COLUMNS[:-1]), mac))
        self._insert_rows("backup_bindings", _BINDING_COLUMNS, rows)

    def append_audit_events(self, events: Sequence[Mapping[str, Any]]) -> list[int]:
        """Appends events after the current head, holding the head's row lock until commit.

        Each mapping has the hashed fields but `sequence`, which the head assigns.
        Returns the sequence numbers, in order.
        """
        if not events:
            return []
        ((sequence, previous),) = self._run.rows(self._sql.lock_audit_head, ())
        mac = self._integrity.audit
        rows = []
        written = []
        for event in events:
            sequence += 1
            fields = {**AUDIT_DEFAULTS, **event, "sequence": sequence}
            fields["outcome"] = str(fields["outcome"])
            digest = event_hash(previous, fields)
            fields["previous_hash"], fields["event_hash"] = previous, digest
            fields["mac"] = mac.event(sequence, digest)
            rows.append(tuple(fields[column] for column in _AUDIT_COLUMNS))
            written.append(fields)
            previous = digest
        self._insert_rows("audit_events", _AUDIT_COLUMNS, rows)
        self._run.run(self._sql.move_audit_head, (sequence, previous, mac.head(sequence, previous)))
        if self._integrity.sink is not None:
            # Before the commit: an event that cannot reach the sink fails the transaction.
            self._integrity.sink(written)
        return [row[0] for row in rows]

    def _insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """Multi-row INSERTs of 64, 32, ... 1 rows: a batch of n rows takes at most
        log2(n) + 1 statements instead of n (SQLite releases the GIL for each, and getting
        it back is what costs in a busy server), from at most 7 texts per table.

        On PostgreSQL one single-row statement for all rows instead: psycopg pipelines an
        executemany into one round trip, and parses the statement once, where it would parse
        every multi-row text again (it caches only statements of few parameters)."""
        if self._run.dialect_name == "postgresql":
            self._run.run_many(self._sql.insert(table, columns, 1), rows)
            return
        start = 0
        while start < len(rows):
            count = min(MAX_ROWS_PER_INSERT, 1 << ((len(rows) - start).bit_length() - 1))
            chunk = rows[start : start + count]
            sql = self._sql.insert(table, columns, count)
            self._run.run(sql, [value for row in chunk for value in row])
            start += count


_AUDIT_COLUMNS = (*HASHED_FIELDS, "previous_hash", "event_hash", "mac")
_BINDING_COLUMNS = (
    "backup_id",
    "key_name",
    "version",
    "wrapped_data_key",
    "created_us",
    "recovered",
    "created_by",
    "mac",  # last: add_bindings computes it
)


# 64 audit rows are 1,152 parameters: far below SQLite's and PostgreSQL's limits.
MAX_ROWS_PER_INSERT = 64


class _DriverSql:
    """The hot path's statements in the driver's own parameter style (sqlite3 `?`, psycopg `%s`)."""

    def __init__(self, dialect_name: str) -> None:
        self.mark = "?" if dialect_name == "sqlite" else "%s"
        # SQLite has no row locks: its transaction already holds the database's write lock.
        lock = " FOR UPDATE" if dialect_name == "postgresql" else ""
        self.lock_audit_head = f"SELECT sequence, event_hash FROM audit_head WHERE id = 1{lock}"
        self.move_audit_head = (
            f"UPDATE audit_head SET sequence = {self.mark}, event_hash = {self.mark},"
            f" mac = {self.mark} WHERE id = 1"
        )
        facts = _VERSION_FACTS.replace("v.", "")
        self.lock_version = (
            f"SELECT {facts} FROM key_versions"
            f" WHERE key_name = {self.mark} AND version = {self.mark}{lock}"
        )
        self.count_wrapped = (
            f"UPDATE key_versions SET data_keys_wrapped = {self.mark},"
            f" state_sequence = {self.mark}, mac = {self.mark}"
            f" WHERE key_name = {self.mark} AND version = {self.mark}"
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
            " b.created_by, b.created_us, b.recovered, b.mac,"
            f" {_VERSION_FACTS}"
            " FROM backup_bindings b JOIN key_versions v"
            " ON v.key_name = b.key_name AND v.version = b.version"
            f" WHERE b.backup_id IN ({self._marks(count)})"
        )

    def active_versions(self, count: int) -> str:
        return (
            "SELECT k.name, k.active_version, k.last_version, k.created_us, k.state_sequence,"
            f" k.mac, k.rotation_period_us, k.next_rotation_us, {_VERSION_FACTS}"
            " FROM keys k LEFT JOIN key_versions v"
            " ON v.key_name = k.name AND v.version = k.active_version"
            f" WHERE k.name IN ({self._marks(count)})"
        )


# A version's columns that its MAC covers, as the hot path reads them (see VersionFacts).
_VERSION_FACTS = (
    "v.state, v.wrapped_material, v.origin, v.created_us, v.destroyed_us, v.state_sequence, v.mac,"
    " v.destroy_due_us, v.destroy_requested_by, v.destroy_approved_by, v.data_keys_wrapped"
)


_DRIVER_SQL: dict[str, _DriverSql] = {}


class VersionFacts(NamedTuple):
    """A version's columns as the hot path reads them: what its MAC covers, and the MAC."""

    state: str
    wrapped_material: bytes | None
    origin: str
    created_us: int
    destroyed_us: int | None
    state_sequence: int | None
    mac: str | None
    destroy_due_us: int | None
    destroy_requested_by: str | None
    destroy_approved_by: str | None
    data_keys_wrapped: int

    def sealed(self, key_name: str, version: int) -> SealedVersion:
        return SealedVersion(
            key_name,
            version,
            self.state,
            self.origin,
            self.wrapped_material is not None,
            self.created_us,
            self.destroyed_us,
            self.state_sequence,
            self.destroy_due_us,
            self.destroy_requested_by,
            self.destroy_approved_by,
            self.data_keys_wrapped,
        )


class BoundVersionFacts(NamedTuple):
    """A backup's binding with its version's facts."""

    backup_id: str
    key_name: str
    version: int
    wrapped_data_key: bytes
    created_by: str
    created_us: int
    recovered: bool
    mac: str | None
    facts: VersionFacts

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> BoundVersionFacts:
        facts = VersionFacts(*row[8:])
        return cls(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], facts)

    def sealed(self) -> SealedBinding:
        return SealedBinding(
            self.backup_id,
            self.key_name,
            self.version,
            self.created_by,
            self.created_us,
            bool(self.recovered),
        )


class ActiveVersionFacts(NamedTuple):
    """A key's row with its active version's facts (None when it has no active version)."""

    name: str
    active_version: int | None
    last_version: int
    created_us: int
    state_sequence: int | None
    mac: str | None
    rotation_period_us: int | None
    next_rotation_us: int | None
    facts: VersionFacts | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> ActiveVersionFacts:
        facts = VersionFacts(*row[8:]) if row[8] is not None else None
        return cls(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], facts)

    def sealed(self) -> SealedKey:
        return SealedKey(
            self.name,
            self.active_version,
            self.last_version,
            self.created_us,
            self.state_sequence,
            self.rotation_period_us,
            self.next_rotation_us,
        )


def sealed_key(row: KeyRow) -> SealedKey:
    return SealedKey(row.name, row.active_version, row.last_version, row.created_us,
                     row.state_sequence, row.rotation_period_us, row.next_rotation_us)  # fmt: skip


def sealed_binding(row: BackupBindingRow) -> SealedBinding:
    return SealedBinding(
        row.backup_id,
        row.key_name,
        row.version,
        row.created_by,
        row.created_us,
        bool(row.recovered),
    )


def sealed_version(row: KeyVersionRow) -> SealedVersion:
    return SealedVersion(
        row.key_name,
        row.version,
        row.state,
        row.origin,
        row.wrapped_material is not None,
        row.created_us,
        row.destroyed_us,
        row.state_sequence,
        row.destroy_due_us,
        row.destroy_requested_by,
        row.destroy_approved_by,
        row.data_keys_wrapped or 0,  # None before the row is flushed
    )


# What an audit event says when a field does not concern it.
AUDIT_DEFAULTS: dict[str, Any] = {
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
        mac=row.mac,
    )
