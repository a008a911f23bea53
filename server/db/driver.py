"""Plain DB-API transactions for the data-key hot path, raising SQLAlchemy's error types.

A Session costs about 80 µs of CPU per transaction and a Core Connection about
50 µs, against about 10 µs for the DB-API connection underneath: more than the
database itself spends on the hot path's few statements. `driver_transaction`
keeps what those layers give us that matters here: pooled connections, driver
errors turned into `sqlalchemy.exc.DBAPIError` subclasses (so callers classify
outages and conflicts the same way on every path), and a connection that was
lost is invalidated rather than handed out again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection

from server.db.engine import take_write_turn


class StatementRunner(Protocol):
    """Runs SQL text in the driver's parameter style inside a transaction someone else ends."""

    dialect_name: str

    def rows(self, sql: str, params: Sequence[Any]) -> Sequence[Sequence[Any]]: ...

    def run(self, sql: str, params: Sequence[Any]) -> None: ...

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class SessionStatements:
    """A StatementRunner inside an ORM session's transaction (the other use cases)."""

    def __init__(self, session: Session) -> None:
        self._connection = session.connection()
        self.dialect_name = self._connection.dialect.name

    def rows(self, sql: str, params: Sequence[Any]) -> Sequence[Sequence[Any]]:
        return self._connection.exec_driver_sql(sql, tuple(params)).all()

    def run(self, sql: str, params: Sequence[Any]) -> None:
        self._connection.exec_driver_sql(sql, tuple(params))

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._connection.exec_driver_sql(sql, list(rows))


class DriverStatements:
    """A StatementRunner on one pooled DB-API connection (see `driver_transaction`)."""

    def __init__(self, dialect: Dialect, connection: PoolProxiedConnection) -> None:
        self.dialect_name = dialect.name
        self._dialect = dialect
        self._connection = connection
        self._cursor: DBAPICursor = connection.cursor()

    def rows(self, sql: str, params: Sequence[Any]) -> Sequence[Sequence[Any]]:
        with self._translated(sql):
            self._cursor.execute(sql, tuple(params))
            return self._cursor.fetchall()

    def run(self, sql: str, params: Sequence[Any]) -> None:
        with self._translated(sql):
            self._cursor.execute(sql, tuple(params))

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._translated(sql):
            self._cursor.executemany(sql, rows)

    def commit(self) -> None:
        with self._translated("COMMIT"):
            self._connection.commit()

    def rollback(self) -> None:
        """Best effort: a connection that cannot even roll back is discarded."""
        if not self._connection.is_valid:
            return  # already invalidated: the pool closes it rather than reuse it
        try:
            self._connection.rollback()
        except self._dialect.loaded_dbapi.Error as error:
            self._connection.invalidate(error)

    @contextmanager
    def _translated(self, sql: str) -> Iterator[None]:
        """Driver errors out as SQLAlchemy's; a lost connection is invalidated on the way."""
        try:
            yield
        except self._dialect.loaded_dbapi.Error as error:
            lost = self._dialect.is_disconnect(
                error, self._connection.dbapi_connection, self._cursor
            )
            if lost:
                self._connection.invalidate(error)  # the pool opens a new one next time
            raise _wrap(self._dialect, error, sql, lost) from error


@contextmanager
def driver_transaction(engine: Engine) -> Iterator[DriverStatements]:
    """One transaction on a pooled DB-API connection: committed if the block returns,
    rolled back if it raises. SQLite's begins IMMEDIATE, like every other writer's
    (see server/db/engine.py)."""
    dialect = engine.dialect
    try:
        connection = engine.raw_connection()
    except dialect.loaded_dbapi.Error as error:
        raise _wrap(dialect, error, None, dialect.is_disconnect(error, None, None)) from error
    try:
        statements = DriverStatements(dialect, connection)
        if dialect.name == "sqlite":
            take_write_turn(connection.info)  # released when the connection goes back
            statements.run("BEGIN IMMEDIATE", ())
        try:
            yield statements
            statements.commit()
        except BaseException:
            statements.rollback()
            raise
    finally:
        connection.close()  # back to the pool, or dropped if invalidated


def _wrap(dialect: Dialect, error: Exception, sql: str | None, lost: bool) -> sa_exc.DBAPIError:
    # Parameters stay out of the message: they hold wrapped keys and backup ids.
    wrapped = sa_exc.DBAPIError.instance(
        sql,
        None,
        error,
        dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=lost,
        dialect=dialect,
    )
    assert isinstance(wrapped, sa_exc.DBAPIError)
    return wrapped
