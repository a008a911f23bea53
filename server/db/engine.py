"""One engine and one sessionmaker per process, set up for how each backend serializes writes."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 5000
# Execution option for a read-only transaction that must see one consistent snapshot.
READ_SNAPSHOT_OPTION = "kms_read_snapshot"


def read_snapshot_options(dialect_name: str) -> dict[str, Any]:
    """`Session.connection(execution_options=...)` for a consistent read-only snapshot:
    REPEATABLE READ on PostgreSQL; on SQLite (WAL) a deferred transaction, which reads one
    snapshot without holding the write lock."""
    if dialect_name == "postgresql":
        return {"isolation_level": "REPEATABLE READ"}
    return {READ_SNAPSHOT_OPTION: True}


def sqlite_url(path: str) -> str:
    return f"sqlite+pysqlite:///{path}"


def make_engine(url: str, *, pool_size: int = 10, statement_timeout_ms: int = 5000) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return create_engine(
            url,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=10,
            pool_pre_ping=True,
            connect_args={
                "options": f"-c statement_timeout={statement_timeout_ms}",
                "connect_timeout": 5,
                # A database host that vanishes without closing the connection is noticed
                # within about a minute instead of the kernel's two hours.
                "keepalives": 1,
                "keepalives_idle": 30,
                "keepalives_interval": 10,
                "keepalives_count": 3,
            },
        )
    raise ValueError(f"unsupported database URL scheme {parsed.drivername!r}")


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    )
    turn_file = f"{make_url(url).database}.writers"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # durable before we reply
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA secure_delete=ON")  # destroyed material is overwritten on disk
        cursor.close()
        record.info[_TURN] = os.open(turn_file, os.O_RDWR | os.O_CREAT, 0o600)

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # SQLite has no row locks: every transaction takes the write lock up
        # front, which serializes writers and avoids lock-upgrade deadlocks.
        # A read-only snapshot (READ_SNAPSHOT) begins DEFERRED and takes no lock.
        if connection.get_execution_options().get(READ_SNAPSHOT_OPTION, False):
            connection.exec_driver_sql("BEGIN DEFERRED")
            return
        take_write_turn(connection.connection.info)
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None and record.info.pop(_HOLDS_TURN, False):
            fcntl.flock(record.info[_TURN], fcntl.LOCK_UN)

    @event.listens_for(engine, "close")
    def _on_close(_dbapi_connection: Any, record: Any) -> None:
        descriptor = record.info.pop(_TURN, None) if record is not None else None
        if descriptor is not None:
            os.close(descriptor)  # also ends a turn it still held

    return engine


# Writers of one SQLite file take turns on an flock of a file beside it, before BEGIN
# IMMEDIATE. SQLite's own wait for its write lock sleeps 1, 2, 5, 10... ms between
# tries: with several processes (--processes) committing back to back, a writer that
# just missed the lock would sleep far longer than the holder keeps it (well under a
# millisecond). Each connection has its own descriptor, so the turn is per connection
# (threads of one process take turns too), and it ends when the connection goes back
# to the pool, after its COMMIT or ROLLBACK.
_TURN = "kms_writer_turn_fd"
_HOLDS_TURN = "kms_holds_writer_turn"


def take_write_turn(info: dict[Any, Any]) -> None:
    """Waits for this SQLite connection's turn to write (see above); a connection that
    already holds it keeps it. Gives up as SQLite would, with "database is locked"."""
    descriptor = info.get(_TURN)
    if descriptor is None:
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    pause = 0.00005
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            info[_HOLDS_TURN] = True
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise sa_exc.OperationalError(
                    "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked")
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.001)


def truncate_sqlite_wal(engine: Engine, attempts: int = 20) -> bool:
    """Copies the WAL into the database file and truncates it to zero bytes, so no frame
    holding a destroyed version's material is left in `-wal` (secure_delete has already
    zeroed it in the database pages). True once done; False if readers kept it busy."""
    connection = engine.raw_connection()
    try:
        for attempt in range(attempts):
            cursor = connection.cursor()
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            (busy, _log_frames, _checkpointed) = cursor.fetchone() or (1, 0, 0)
            cursor.close()
            if not busy:
                return True
            time.sleep(0.01 * (attempt + 1))
        return False
    finally:
        connection.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
