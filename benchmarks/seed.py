"""Seeds a stopped kms-server's database with bulk SQL inserts through SQLAlchemy Core.

Uses the server's own models, wraps real version material under the
server's root key (so the server can use every seeded version), wraps valid
data keys for a sample of the bindings (the ones the benchmark resolves) and
extends the audit hash chain from the current head with the server's own MACs,
updating `audit_head`, so `VerifyAuditLog` still finds the whole chain intact.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, create_engine, event, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from server.db.engine import sqlite_url
from server.db.models import AuditEventRow, AuditHeadRow, BackupBindingRow, KeyRow, KeyVersionRow
from server.db.repository import AUDIT_DEFAULTS, MetaStore
from server.domain.audit_chain import event_hash
from server.domain.integrity import SealedKey, SealedVersion
from server.domain.model import Action, Outcome, VersionOrigin, VersionState
from server.keystore import crypto, server_keys

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
    """Adds `keys` keys holding `versions` versions in all, `bindings` bindings and events.

    The keys and versions are recorded in the log as the server would have (a registration
    per version, then a rotation per key to its newest), and every row is sealed and every
    event MAC'd with the server's own keys, so the server uses them and VerifyAuditLog finds
    log and state in agreement.
    """
    started = time.perf_counter()
    root_key = crypto.RootKey.load(data_dir / "root.key")
    per_key = versions // keys
    names = [f"scale-key-{k:04d}" for k in range(keys)]
    created = time.time_ns() // 1000
    materials: dict[tuple[str, int], bytes] = {}
    engine = _engine(database_url, data_dir)
    try:
        with Session(engine) as session:
            server = server_keys.load(MetaStore(session), root_key)
            head = MetaStore(session).audit_head()
        if server is None:
            raise RuntimeError("seed a database a kms-server has started on (it has no keys yet)")
        chain = _Chain(server, head.sequence, head.event_hash)
        register_events = [
            chain.event(
                created, "dev-admin", Action.REGISTER_VERSION, key_name=name, version=version
            )
            for name in names
            for version in range(1, per_key + 1)
        ]
        rotate_events = [
            chain.event(
                created,
                "dev-admin",
                Action.ROTATE,
                key_name=name,
                from_version=per_key - 1 if per_key > 1 else 0,
                to_version=per_key,
            )
            for name in names
        ]
        with engine.begin() as connection:
            version_rows = []
            for index, name in enumerate(names):
                for version in range(1, per_key + 1):
                    material = crypto.new_key_material()
                    materials[name, version] = material
                    row = {
                        "key_name": name,
                        "version": version,
                        "state": str(VersionState.ENABLED),
                        "origin": str(VersionOrigin.GENERATED),
                        "wrapped_material": root_key.wrap_version_material(name, version, material),
                        "created_us": created,
                        "destroyed_us": None,
                        "state_sequence": register_events[index * per_key + version - 1][
                            "sequence"
                        ],
                    }
                    row["mac"] = server.state.version_mac(
                        SealedVersion(
                            name,
                            version,
                            row["state"],
                            row["origin"],
                            True,
                            created,
                            None,
                            row["state_sequence"],
                        )
                    )
                    version_rows.append(row)
            key_rows = []
            for name, rotation in zip(names, rotate_events, strict=True):
                row = {
                    "name": name,
                    "active_version": None,
                    "last_version": per_key,
                    "created_us": created,
                    "state_sequence": rotation["sequence"],
                }
                sealed = SealedKey(name, per_key, per_key, created, rotation["sequence"])
                row["mac"] = server.state.key_mac(sealed)
                key_rows.append(row)
            # Keys first (no active version yet: it must exist first), then versions.
            connection.execute(_table(KeyRow).insert(), key_rows)
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
            _append_audit_chain(connection, chain, [*register_events, *rotate_events])
            _append_audit_chain(
                connection, chain, _data_key_events(chain, audit_events, names, per_key)
            )
    finally:
        engine.dispose()
    return SeedResult(
        keys=names,
        versions=per_key * keys,
        bindings=bindings,
        audit_events=audit_events + len(names) * (per_key + 1),
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


class _Chain:
    """Numbers, hashes and MACs events after the head, as the server's DataKeyStore does."""

    def __init__(self, server: server_keys.ServerKeys, sequence: int, previous: str) -> None:
        self.server = server
        self.sequence = sequence
        self.previous = previous

    def event(self, time_us: int, actor: str, action: Action, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        event: dict[str, Any] = {
            "sequence": self.sequence,
            "time_us": time_us,
            "actor": actor,
            "action": str(action),
            "outcome": str(Outcome.ALLOWED),
            "status_code": "OK",
            **AUDIT_DEFAULTS,
            **fields,
        }
        digest = event_hash(self.previous, event)
        event["previous_hash"], event["event_hash"] = self.previous, digest
        event["mac"] = self.server.audit.event(self.sequence, digest)
        self.previous = digest
        return event


def _data_key_events(
    chain: _Chain, count: int, names: list[str], per_key: int
) -> Iterator[dict[str, Any]]:
    time_us = time.time_ns() // 1000 - count
    actions = (Action.ISSUE_DATA_KEY, Action.RESOLVE_DATA_KEY)
    actors = ("dev-backup", "dev-restore")
    for n in range(count):
        yield chain.event(
            time_us + n,
            actors[n % 2],
            actions[n % 2],
            key_name=names[n % len(names)],
            version=(n // len(names)) % per_key + 1,
            backup_id=f"scale-{n // 2:08d}",
        )


def _append_audit_chain(
    connection: Connection, chain: _Chain, events: Iterable[dict[str, Any]]
) -> None:
    """Inserts the events, then moves the head (with its MAC) to the chain's end."""
    for batch in _batches(iter(events)):
        _insert(connection, _table(AuditEventRow), batch)
    heads = _table(AuditHeadRow)
    mac = chain.server.audit.head(chain.sequence, chain.previous)
    connection.execute(
        heads.update()
        .where(heads.c.id == 1)
        .values(sequence=chain.sequence, event_hash=chain.previous, mac=mac)
    )
