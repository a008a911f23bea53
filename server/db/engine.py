"""One engine and one sessionmaker per process, set up for how each backend serializes writes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
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

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # durable before we reply
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA secure_delete=ON")  # destroyed material is overwritten on disk
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # SQLite has no row locks: every transaction takes the write lock up
        # front, which serializes writers and avoids lock-upgrade deadlocks.
        # A read-only snapshot (READ_SNAPSHOT) begins DEFERRED and takes no lock.
        read_only = connection.get_execution_options().get(READ_SNAPSHOT_OPTION, False)
        connection.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
