"""Seeds a stopped kms-server's database with bulk SQL inserts through SQLAlchemy Core.

Uses the server's own models, wraps real version material under the
server's root key (so the server can use every seeded version), wraps valid
data keys for a sample of the bindings (the ones the benchmark resolves) and
extends the audit hash chain from the current head, updating `audit_head`, so
`VerifyAuditLog` still finds the whole chain intact.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, create_engine, event, select, update
from sqlalchemy.engine import make_url

from server import crypto
from server.db.engine import sqlite_url
from server.db.models import AuditEventRow, AuditHeadRow, BackupBindingRow, KeyRow, KeyVersionRow
from server.domain.audit_chain import GENESIS_HASH, event_hash
from server.domain.model import Action, Outcome, VersionOrigin, VersionState

BATCH = 50_000
SAMPLE_SIZE = 10_000  # bindings with a data key wrapped for real; the rest hold filler blobs


@dataclass
class SeedResult:
    keys: list[str]
    versions: int
    bindings: int
    audit_events: int
    seconds: float
    sample_backup_ids: list[str] = field(default_factory=list)


def _table(model: Any) -> Table:
    return cast(Table, model.__table__)


def _engine(database_url: str, data_dir: Path) -> Engine:
    if not database_url:
        engine = create_engine(sqlite_url(str(data_dir / "kms.sqlite3")))

        @event.listens_for(engine, "connect")
        def _fast(dbapi_connection: Any, _record: Any) -> None:
            # Bulk loading into a stopped server's file: durability comes from the final commit.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    url = make_url(database_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return create_engine(url)


def _batches(rows: Iterator[dict[str, Any]], size: int = BATCH) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def seed(
    data_dir: Path,
    database_url: str,
    *,
    keys: int,
    versions: int,
    bindings: int,
    audit_events: int,
) -> SeedResult:
    """Adds `keys` keys holding `versions` versions in all, `bindings` bindings and events."""
    started = time.perf_counter()
    root_key = crypto.RootKey.load(data_dir / "root.key")
    per_key = versions // keys
    names = [f"scale-key-{k:04d}" for k in range(keys)]
    created = time.time_ns() // 1000
    materials: dict[tuple[str, int], bytes] = {}
    engine = _engine(database_url, data_dir)
    try:
        with engine.begin() as connection:
            connection.execute(
                _table(KeyRow).insert(),
                [
                    {
                        "name": n,
                        "active_version": None,
                        "last_version": per_key,
                        "created_us": created,
                    }
                    for n in names
                ],
            )
            version_rows = []
            for name in names:
                for version in range(1, per_key + 1):
                    material = crypto.new_key_material()
                    materials[name, version] = material
                    version_rows.append(
                        {
                            "key_name": name,
                            "version": version,
                            "state": str(VersionState.ENABLED),
                            "origin": str(VersionOrigin.GENERATED),
                            "wrapped_material": root_key.wrap_version_material(
                                name, version, material
                            ),
                            "created_us": created,
                            "destroyed_us": None,
                        }
                    )
            for batch in _batches(iter(version_rows)):
                connection.execute(_table(KeyVersionRow).insert(), batch)
            connection.execute(
                update(_table(KeyRow))
                .where(_table(KeyRow).c.name.in_(names))
                .values(active_version=per_key)
            )

        stride = max(1, bindings // SAMPLE_SIZE)
        sample: list[str] = []
        filler = crypto.BLOB_FORMAT + os.urandom(crypto.NONCE_BYTES + 32 + 16)

        def binding_rows() -> Iterator[dict[str, Any]]:
            for n in range(bindings):
                backup_id = f"scale-{n:08d}"
                name = names[n % keys]
                version = (n // keys) % per_key + 1
                if n % stride == 0:
                    wrapped = crypto.wrap_data_key(
                        materials[name, version], backup_id, name, version,
                        crypto.new_key_material(),
                    )  # fmt: skip
                    sample.append(backup_id)
                else:
                    wrapped = filler
                yield {
                    "backup_id": backup_id,
                    "key_name": name,
                    "version": version,
                    "wrapped_data_key": wrapped,
                    "created_us": created,
                    "recovered": False,
                }

        with engine.begin() as connection:
            for batch in _batches(binding_rows()):
                _insert(connection, _table(BackupBindingRow), batch)

        with engine.begin() as connection:
            _append_audit_chain(connection, audit_events, names, per_key)
    finally:
        engine.dispose()
    return SeedResult(
        keys=names,
        versions=per_key * keys,
        bindings=bindings,
        audit_events=audit_events,
        seconds=time.perf_counter() - started,
        sample_backup_ids=sample,
    )


def _insert(connection: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """A Core executemany; on SQLite straight to the driver with tuples, three times faster."""
    if connection.dialect.name != "sqlite":
        connection.execute(table.insert(), rows)
        return
    columns = list(rows[0])
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)})"
    )
    connection.exec_driver_sql(sql, [tuple(row[c] for c in columns) for row in rows])


def _append_audit_chain(connection: Connection, count: int, names: list[str], per_key: int) -> None:
    """Appends `count` events after the current head with correct links, then moves the head."""
    heads = _table(AuditHeadRow)
    head = connection.execute(select(heads.c.sequence, heads.c.event_hash).where(heads.c.id == 1))
    row = head.one_or_none()
    sequence, previous = (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)
    time_us = time.time_ns() // 1000 - count
    actions = (str(Action.ISSUE_DATA_KEY), str(Action.RESOLVE_DATA_KEY))
    actors = ("dev-backup", "dev-restore")
    allowed = str(Outcome.ALLOWED)

    def events() -> Iterator[dict[str, Any]]:
        nonlocal sequence, previous
        for n in range(count):
            sequence += 1
            fields: dict[str, Any] = {
                "sequence": sequence,
                "time_us": time_us + n,
                "actor": actors[n % 2],
                "action": actions[n % 2],
                "outcome": allowed,
                "status_code": "OK",
                "key_name": names[n % len(names)],
                "version": (n // len(names)) % per_key + 1,
                "from_version": 0,
                "to_version": 0,
                "backup_id": f"scale-{n // 2:08d}",
                "reason": "",
                "detail": "",
            }
            digest = event_hash(previous, fields)
            fields["previous_hash"] = previous
            fields["event_hash"] = digest
            previous = digest
            yield fields

    for batch in _batches(events()):
        _insert(connection, _table(AuditEventRow), batch)
    if row is None:
        connection.execute(heads.insert().values(id=1, sequence=sequence, event_hash=previous))
    else:
        connection.execute(
            heads.update().where(heads.c.id == 1).values(sequence=sequence, event_hash=previous)
        )
