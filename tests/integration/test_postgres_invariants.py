"""Invariants the database keeps itself, on SQLite and on PostgreSQL.

- One active version per key is structural: `keys.active_version` is a single
  column, and a composite foreign key (name, active_version) -> key_versions
  refuses a version of another key or a missing one.
- Rotations of one key serialize. PostgreSQL: `SELECT ... FOR UPDATE` on the
  key row. SQLite: SQLAlchemy drops FOR UPDATE there, so every transaction
  begins IMMEDIATE and holds the database's one write lock until it ends.
- Concurrent first registrations of one new key end as versions 1..N: the
  losers of the race to insert the key row retry (IntegrityError) and queue
  on its lock.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, exc, select, text
from sqlalchemy.engine import make_url

from server.db import migrate
from server.db.engine import make_engine, sqlite_url
from server.db.models import KeyRow
from server.domain.errors import Aborted, FailedPrecondition
from server.domain.model import Principal, Role
from server.keystore.crypto import RootKey
from server.service import KeyManagementService
from tests.conftest import fresh_postgres_database

ADMIN = Principal("admin", frozenset(Role))


@dataclass
class Backend:
    name: str
    engine: Engine
    service: KeyManagementService


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    urls = (
        iter([sqlite_url(str(tmp_path / "kms.sqlite3"))])
        if request.param == "sqlite"
        else fresh_postgres_database()
    )
    for url in urls:
        engine = make_engine(url, pool_size=20)
        try:
            migrate.upgrade(engine)
            RootKey.create(tmp_path / "root.key")
            service = KeyManagementService(engine, RootKey.load(tmp_path / "root.key"))
            service.check_root_key()
            yield Backend(request.param, engine, service)
        finally:
            engine.dispose()


def _register(service: KeyManagementService, key: str, versions: int) -> None:
    for number in range(1, versions + 1):
        service.keys.register_key_version(ADMIN, key, b"", activate_first_version=number == 1)


def test_the_active_version_must_be_an_existing_version_of_the_same_key(
    backend: Backend,
) -> None:
    _register(backend.service, "a", 1)
    _register(backend.service, "b", 3)
    with backend.engine.connect() as connection:
        # Pretend "a" had versions up to 5, so only the foreign key can refuse what follows.
        connection.execute(text("UPDATE keys SET last_version = 5 WHERE name = 'a'"))
        connection.commit()
        for version in (3, 4):  # b's version 3; a version that exists for no key
            with pytest.raises(exc.IntegrityError):
                connection.execute(
                    text("UPDATE keys SET active_version = :v WHERE name = 'a'"), {"v": version}
                )
            connection.rollback()
        active = connection.execute(text("SELECT active_version FROM keys WHERE name = 'a'"))
        assert active.scalar_one() == 1


def test_sqlite_drops_for_update_so_its_transactions_begin_immediate(backend: Backend) -> None:
    query = select(KeyRow).where(KeyRow.name == "k").with_for_update()
    assert "FOR UPDATE" in str(query.compile(dialect=make_url("postgresql://").get_dialect()()))
    assert "FOR UPDATE" not in str(query.compile(dialect=make_url("sqlite://").get_dialect()()))
    if backend.name == "sqlite":
        database = backend.engine.url.database
        assert database is not None
        with backend.engine.connect() as connection:
            # The engine's "begin" hook: even a read takes the write lock up front...
            connection.exec_driver_sql("SELECT 1")
            other = sqlite3.connect(database, timeout=0, isolation_level=None)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            finally:
                other.close()
            connection.rollback()


def test_a_rotation_waits_for_whoever_holds_the_key(backend: Backend) -> None:
    """PostgreSQL: the key row's lock. SQLite: the database's write lock."""
    _register(backend.service, "k", 2)
    finished = threading.Event()

    def rotate() -> None:
        backend.service.keys.rotate_active(ADMIN, "k", 2, 1, "waits")
        finished.set()

    with backend.engine.connect() as holder:
        # On SQLite this BEGINs IMMEDIATE; on PostgreSQL it locks the key row.
        holder.execute(select(KeyRow).where(KeyRow.name == "k").with_for_update()).one()
        thread = threading.Thread(target=rotate)
        thread.start()
        assert not finished.wait(0.7), "the rotation did not wait for the lock"
        holder.rollback()
    thread.join(timeout=10)
    assert finished.is_set()


def test_concurrent_unguarded_rotations_form_one_line(backend: Backend) -> None:
    """Without a lock two rotations could both read the same 'from' version (a lost update)."""
    versions, calls = 4, 24
    _register(backend.service, "k", versions)
    workers = 8
    barrier = threading.Barrier(workers)

    def rotate(worker: int) -> list[int]:
        barrier.wait(timeout=10)
        sequences = []
        for n in range(calls // workers):
            target = (worker + n) % (versions - 1) + 2  # 2, 3 or 4
            try:
                rotation = backend.service.keys.rotate_active(ADMIN, "k", target, None, "race")
            except FailedPrecondition as error:
                assert error.reason == "ALREADY_ACTIVE"
                continue
            sequences.append(rotation.audit_sequence)
        return sequences

    with ThreadPoolExecutor(max_workers=workers) as pool:
        sequences = [s for batch in pool.map(rotate, range(workers)) for s in batch]

    events = backend.service.audit.list_audit_events(ADMIN, 1000, "", "k")[0]
    rotations = sorted(
        (e for e in events if e.action == "key.rotate" and e.outcome == "allowed"),
        key=lambda e: e.sequence,
    )
    assert sorted(e.sequence for e in rotations) == sorted(sequences)
    assert rotations[0].from_version == 1
    for before, after in itertools.pairwise(rotations):
        assert after.from_version == before.to_version
    assert backend.service.audit.verify_audit_log(ADMIN).intact


def test_concurrent_guarded_rotations_let_exactly_one_win(backend: Backend) -> None:
    _register(backend.service, "k", 9)

    def rotate(target: int) -> bool:
        try:
            backend.service.keys.rotate_active(ADMIN, "k", target, 1, "guarded")
        except Aborted:
            return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        wins = list(pool.map(rotate, range(2, 10)))
    assert wins.count(True) == 1
    key = backend.service.keys.list_keys(ADMIN, 10, "")[0][0]
    assert key.active_version == 2 + wins.index(True)


def test_concurrent_first_registrations_of_one_key_number_its_versions(
    backend: Backend,
) -> None:
    threads, per_thread = 12, 3
    barrier = threading.Barrier(threads)

    def register(_: int) -> list[int]:
        barrier.wait(timeout=10)
        return [
            backend.service.keys.register_key_version(ADMIN, "new-key", b"", False).version
            for _ in range(per_thread)
        ]

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        numbers = [n for batch in pool.map(register, range(threads)) for n in batch]
    assert sorted(numbers) == list(range(1, threads * per_thread + 1))
    listed = backend.service.keys.list_key_versions(ADMIN, "new-key")
    assert [info.version for info in listed] == list(range(1, threads * per_thread + 1))
    assert time.monotonic() - start < 60
    assert backend.service.audit.verify_audit_log(ADMIN).intact


@pytest.mark.postgres
def test_the_statement_timeout_setting_reaches_postgresql() -> None:
    for url in fresh_postgres_database():
        engine = make_engine(url, statement_timeout_ms=1234)
        try:
            with engine.connect() as connection:
                assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "1234ms"
        finally:
            engine.dispose()
