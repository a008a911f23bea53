"""Faults: a replica killed mid-load, the database cut off and back, a database restored from an
older snapshot. In each case every answer a client got stays true, nothing is half-written (every
binding has its audit event and the other way round), and the audit chain verifies.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from kms.v1 import kms_pb2
from server.db.engine import sqlite_url
from server.domain.errors import Unavailable
from server.domain.model import Principal, Role
from server.keystore.crypto import RootKey
from server.service import KeyManagementService
from tests.conftest import KmsStub, RunningKms, fresh_postgres_database, start_kms
from tests.integration.cluster import (
    Replica,
    Secrets,
    TcpProxy,
    attempt,
    audit_events,
    code_of,
    postgres_database,
    reason_of,
    register,
    replicas,
    verify_chain,
    wait_for,
)

ALLOWED = kms_pb2.AUDIT_OUTCOME_ALLOWED


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(str(tmp_path / "kms.sqlite3"))
    else:
        yield from postgres_database()


def _issue(key: str, backup_id: str) -> kms_pb2.GetActiveKeyRequest:
    return kms_pb2.GetActiveKeyRequest(key_name=key, backup_id=backup_id)


def _bindings_match_audit(database_url: str, auditor: KmsStub) -> set[str]:
    """Every binding in the database has exactly one allowed data_key.issue event, and back."""
    url = make_url(database_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT backup_id FROM backup_bindings"))
            bound = {row[0] for row in rows}
    finally:
        engine.dispose()
    issued = [
        event.backup_id
        for event in audit_events(auditor)
        if event.action == "data_key.issue" and event.outcome == ALLOWED
    ]
    assert len(issued) == len(set(issued)), "a data key was issued twice for one backup"
    assert set(issued) == bound
    return bound


class Load:
    """GetActiveKey calls with fresh backup ids from several threads until stopped."""

    def __init__(self, stubs: Callable[[int], KmsStub], key: str, threads: int = 8) -> None:
        self._stubs = stubs
        self._key = key
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answered: dict[str, Any] = {}
        self.failed: dict[str, grpc.StatusCode] = {}
        self.reasons: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=threads)
        self._futures = [self._pool.submit(self._run, n) for n in range(threads)]

    def _run(self, worker: int) -> None:
        calls = 0
        while not self._stop.is_set() and calls < 2000:
            calls += 1
            backup_id = f"load-{uuid.uuid4()}"
            stub = self._stubs(worker + calls)
            request = _issue(self._key, backup_id)
            outcome = attempt(lambda: stub.GetActiveKey(request, timeout=20))  # noqa: B023
            with self._lock:
                if isinstance(outcome, grpc.RpcError):
                    self.failed[backup_id] = code_of(outcome)
                    self.reasons.add(reason_of(outcome))
                else:
                    self.answered[backup_id] = outcome
            if isinstance(outcome, grpc.RpcError):
                time.sleep(0.05)

    def count(self) -> int:
        with self._lock:
            return len(self.answered)

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=60)
        self._pool.shutdown()


def test_a_replica_killed_mid_load_loses_no_answered_backup(
    shared_database: str, tmp_path: Path
) -> None:
    secrets = Secrets.create(tmp_path / "secrets")
    # SQLite is one process's file; PostgreSQL gets two replicas.
    count = 1 if shared_database.startswith("sqlite") else 2
    with replicas(shared_database, secrets, tmp_path, count=count) as started:
        victim = started[0]
        register(victim.stub("admin"), "tenant", 1)
        stubs = [replica.stub("backup") for replica in started]
        load = Load(lambda n: stubs[n % len(stubs)], "tenant")
        try:
            wait_for(lambda: load.count() >= 150, 60, "150 answered calls")
            victim.kill()  # SIGKILL: no graceful shutdown, transactions cut mid-way
            before_restart = load.count()
            time.sleep(0.5)
            victim.start()  # same database, new port
            stubs[0] = victim.stub("backup")
            wait_for(lambda: load.count() >= before_restart + 50, 60, "calls after the restart")
        finally:
            load.stop()
        assert set(load.failed.values()) <= {grpc.StatusCode.UNAVAILABLE}, load.failed

        for replica in started:
            restore = replica.stub("restore")
            for backup_id, made in load.answered.items():
                got = restore.ResolveKeyForBackup(
                    kms_pb2.ResolveKeyForBackupRequest(backup_id=backup_id)
                )
                assert (got.version, got.data_key) == (made.version, made.data_key)
        auditor = started[-1].stub("auditor")
        bound = _bindings_match_audit(shared_database, auditor)
        assert set(load.answered) <= bound
        verify_chain(auditor)


@pytest.mark.postgres
def test_a_cut_database_connection_fails_calls_cleanly_and_heals(tmp_path: Path) -> None:
    for direct_url in postgres_database():
        proxy = TcpProxy(("127.0.0.1", make_url(direct_url).port or 5432))
        try:
            proxied_url = make_url(direct_url).set(host="127.0.0.1", port=proxy.port)
            proxied = proxied_url.render_as_string(hide_password=False)
            secrets = Secrets.create(tmp_path / "secrets")
            with replicas(proxied, secrets, tmp_path, count=1) as (server,):
                _cut_and_heal(server, proxy, direct_url)
        finally:
            proxy.close()


def _cut_and_heal(server: Replica, proxy: TcpProxy, direct_url: str) -> None:
    register(server.stub("admin"), "tenant", 1)
    assert server.health() == "SERVING"
    assert server.health("") == "SERVING"
    backup = server.stub("backup")
    load = Load(lambda n: backup, "tenant", threads=6)
    try:
        wait_for(lambda: load.count() >= 50, 60, "50 answered calls")
        proxy.cut()
        cut_at = time.monotonic()
        not_serving_after = wait_for(
            lambda: server.health() == "NOT_SERVING", 10, "health NOT_SERVING"
        )
        outage = attempt(lambda: backup.GetActiveKey(_issue("tenant", "during-outage")))
        assert isinstance(outage, grpc.RpcError)
        assert code_of(outage) == grpc.StatusCode.UNAVAILABLE
        assert reason_of(outage) == "DATABASE_UNAVAILABLE"
        denied = attempt(
            lambda: server.stub("restore").ResolveKeyForBackup(
                kms_pb2.ResolveKeyForBackupRequest(backup_id="missing")
            )
        )
        # A denial that cannot be audited is reported as the outage it is (fail closed).
        assert isinstance(denied, grpc.RpcError)
        assert code_of(denied) == grpc.StatusCode.UNAVAILABLE
        time.sleep(max(0.0, 3 - (time.monotonic() - cut_at)))
        assert server.health() == "NOT_SERVING"

        proxy.restore()
        restored_at = time.monotonic()
        serving_after = wait_for(lambda: server.health() == "SERVING", 15, "health SERVING")
        answered = load.count()
        calls_after = wait_for(lambda: load.count() >= answered + 20, 30, "calls to succeed")
        print(
            f"\nhealth NOT_SERVING {not_serving_after:.2f}s after the cut; SERVING "
            f"{serving_after:.2f}s after the database came back; load flowing again "
            f"{time.monotonic() - restored_at:.2f}s after ({calls_after:.2f}s for 20 calls)"
        )
    finally:
        load.stop()
    # Calls failed with UNAVAILABLE, never UNKNOWN or INTERNAL.
    assert load.failed, "the outage was seen by the load"
    assert set(load.failed.values()) == {grpc.StatusCode.UNAVAILABLE}, load.failed
    assert load.reasons == {"DATABASE_UNAVAILABLE"}

    restore, auditor = server.stub("restore"), server.stub("auditor")
    for backup_id, made in load.answered.items():
        got = restore.ResolveKeyForBackup(kms_pb2.ResolveKeyForBackupRequest(backup_id=backup_id))
        assert (got.version, got.data_key) == (made.version, made.data_key)
    bound = _bindings_match_audit(direct_url, auditor)
    assert set(load.answered) <= bound
    assert "during-outage" not in bound
    verify_chain(auditor)


# Restore from an older snapshot


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def snapshots(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Snapshots]:
    if request.param == "sqlite":
        yield SqliteSnapshots(tmp_path)
        return
    for url in fresh_postgres_database():
        snapshots = PostgresSnapshots(url, tmp_path)
        try:
            yield snapshots
        finally:
            snapshots.drop()


class Snapshots:
    """Starts the server on the live database, snapshots it, and restores the snapshot."""

    database_url = ""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def start(self) -> RunningKms:
        return start_kms(self.data_dir, self.database_url)

    def take(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError


class SqliteSnapshots(Snapshots):
    """Copies the database file while the server is stopped."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path / "kms")
        self.snapshot = tmp_path / "snapshot"

    def take(self) -> None:
        self.snapshot.mkdir()
        for path in self.data_dir.glob("kms.sqlite3*"):
            shutil.copy2(path, self.snapshot / path.name)

    def restore(self) -> None:
        for path in self.data_dir.glob("kms.sqlite3*"):
            path.unlink()
        for path in self.snapshot.iterdir():
            shutil.copy2(path, self.data_dir / path.name)


class PostgresSnapshots(Snapshots):
    """CREATE DATABASE snapshot TEMPLATE live (no connections on live); restore = serve from it."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        super().__init__(tmp_path / "kms")
        self.database_url = url
        self._admin = create_engine(
            make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT"
        )
        self._live = make_url(url).database
        self._snapshot = f"{self._live}_snap"

    def take(self) -> None:
        with self._admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self._snapshot}" TEMPLATE "{self._live}"'))

    def restore(self) -> None:
        url = make_url(self.database_url).set(database=self._snapshot)
        self.database_url = url.render_as_string(hide_password=False)

    def drop(self) -> None:
        with self._admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self._snapshot}" WITH (FORCE)'))
        self._admin.dispose()


def _header(reply: Any) -> kms_pb2.BackupKeyReference:
    """What an archive header records: the GetActiveKey response's key, version, wrapped key."""
    return kms_pb2.BackupKeyReference(
        key_name=reply.key_name, version=reply.version, wrapped_data_key=reply.wrapped_data_key
    )


def _resolve(
    stub: KmsStub, backup_id: str, header: kms_pb2.BackupKeyReference | None = None
) -> Any:
    request = kms_pb2.ResolveKeyForBackupRequest(backup_id=backup_id)
    if header is not None:
        request.recovery.CopyFrom(header)
    return attempt(lambda: stub.ResolveKeyForBackup(request))


def _failure(outcome: Any) -> tuple[grpc.StatusCode, str]:
    assert isinstance(outcome, grpc.RpcError), outcome
    return code_of(outcome), reason_of(outcome)


def test_backups_made_after_the_snapshot_restore_from_their_headers(
    snapshots: Snapshots,
) -> None:
    server = snapshots.start()
    admin, backup = server.stub("admin"), server.stub("backup")
    try:
        register(admin, "tenant", 2)  # version 1 active, version 2 ready
        register(admin, "old", 2)
        before = backup.GetActiveKey(_issue("tenant", "before-snapshot"))
        shredded = backup.GetActiveKey(_issue("old", "shredded"))
        admin.RotateActive(kms_pb2.RotateActiveRequest(key_name="old", to_version=2))
        admin.DestroyKeyVersion(kms_pb2.DestroyKeyVersionRequest(key_name="old", version=1))
    finally:
        server.close()
    snapshots.take()

    server = snapshots.start()
    admin, backup = server.stub("admin"), server.stub("backup")
    try:
        late_v1 = backup.GetActiveKey(_issue("tenant", "after-v1"))
        admin.RotateActive(kms_pb2.RotateActiveRequest(key_name="tenant", to_version=2))
        after = {
            f"after-v2-{n}": backup.GetActiveKey(_issue("tenant", f"after-v2-{n}"))
            for n in range(3)
        }
        admin.DestroyKeyVersion(kms_pb2.DestroyKeyVersionRequest(key_name="tenant", version=1))
        admin.RegisterKeyVersion(kms_pb2.RegisterKeyVersionRequest(key_name="tenant"))
        admin.RotateActive(kms_pb2.RotateActiveRequest(key_name="tenant", to_version=3))
        lost = backup.GetActiveKey(_issue("tenant", "after-v3"))
        assert (late_v1.version, lost.version) == (1, 3)
    finally:
        server.close()

    snapshots.restore()
    server = snapshots.start()
    restore, admin, auditor = server.stub("restore"), server.stub("admin"), server.stub("auditor")
    try:
        # Bound before the snapshot: resolves as usual.
        got = _resolve(restore, "before-snapshot")
        assert (got.version, got.data_key, got.recovered) == (1, before.data_key, False)

        # Made after the snapshot: unknown, until its header is presented.
        assert _failure(_resolve(restore, "after-v2-0")) == (
            grpc.StatusCode.NOT_FOUND,
            "BACKUP_NOT_FOUND",
        )
        # A header taken from another backup is refused, and records nothing.
        assert _failure(_resolve(restore, "after-v2-1", _header(after["after-v2-2"]))) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "RECOVERY_KEY_MISMATCH",
        )
        for backup_id, made in after.items():
            got = _resolve(restore, backup_id, _header(made))
            assert (got.key_name, got.version, got.data_key, got.recovered) == (
                "tenant",
                2,
                made.data_key,
                True,
            )
            # The binding is recorded: the next resolve needs no header and is no recovery.
            again = _resolve(restore, backup_id)
            assert (again.version, again.data_key, again.recovered) == (2, made.data_key, False)

        # Its version did not exist at the snapshot: its material is gone with the lost period.
        assert _failure(_resolve(restore, "after-v3", _header(lost))) == (
            grpc.StatusCode.NOT_FOUND,
            "BACKUP_NOT_FOUND",
        )
        # Destroyed before the snapshot: stays destroyed, header or not.
        for header in (None, _header(shredded)):
            assert _failure(_resolve(restore, "shredded", header)) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "KEY_VERSION_DESTROYED",
            )
        # Destroyed after the snapshot: the snapshot brought version 1 back, so the operator
        # replays the destruction; then its backups' headers recover nothing either.
        admin.RotateActive(kms_pb2.RotateActiveRequest(key_name="tenant", to_version=2))
        admin.DestroyKeyVersion(kms_pb2.DestroyKeyVersionRequest(key_name="tenant", version=1))
        assert _failure(_resolve(restore, "after-v1", _header(late_v1))) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "KEY_VERSION_DESTROYED",
        )
        assert _failure(_resolve(restore, "after-v1")) == (
            grpc.StatusCode.NOT_FOUND,
            "BACKUP_NOT_FOUND",
        )

        recoveries = [
            event
            for event in audit_events(auditor)
            if event.action == "data_key.recover_binding" and event.outcome == ALLOWED
        ]
        assert sorted(event.backup_id for event in recoveries) == sorted(after)
        assert all((event.key_name, event.version) == ("tenant", 2) for event in recoveries)
        verify_chain(auditor)
    finally:
        server.close()


def test_a_pool_timeout_is_an_outage_not_an_unknown_error(tmp_path: Path) -> None:
    """sqlalchemy.exc.TimeoutError (no free connection) is not a DBAPIError; it is UNAVAILABLE."""
    # A real pool of one connection, held by someone else for the whole call.
    engine = create_engine(
        sqlite_url(str(tmp_path / "kms.sqlite3")), pool_size=1, max_overflow=0, pool_timeout=0.1
    )
    told: list[bool] = []
    service = KeyManagementService(
        engine, RootKey(os.urandom(32)), on_unavailable=lambda: told.append(True)
    )
    caller = Principal("backup", frozenset(Role))
    held = engine.connect()
    try:
        with pytest.raises(Unavailable) as raised:
            asyncio.run(service.data_keys.get_active_key(caller, "tenant", "backup-1"))
    finally:
        held.close()
        service.close()
        engine.dispose()
    assert raised.value.reason == "DATABASE_UNAVAILABLE"
    assert told == [True], "the health probe is told at once"
