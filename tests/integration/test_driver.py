"""The hot path's DB-API transactions: SQLAlchemy's error types, rollback, lost connections."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from server.db import migrate
from server.db.driver import driver_transaction
from server.db.engine import make_engine, sqlite_url
from server.db.repository import DataKeyStore, Integrity
from server.domain.integrity import AuditMac, StateSeal

BINDING = ("backup-1", "tenant", 1, b"sentinel-7f3a", 1, False, "agent")
INTEGRITY = Integrity(AuditMac(b"a" * 32), StateSeal(b"s" * 32))


@pytest.fixture
def engine(database_url: str, tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(database_url or sqlite_url(str(tmp_path / "kms.sqlite3")))
    migrate.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO keys (name, active_version, last_version, created_us)"
                " VALUES ('tenant', NULL, 1, 1)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO key_versions (key_name, version, state, origin, wrapped_material,"
                " created_us) VALUES ('tenant', 1, 'enabled', 'generated', :material, 1)"
            ),
            {"material": b"m" * 60},
        )
    yield engine
    engine.dispose()


def bindings(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM backup_bindings")).scalar_one())


def test_a_block_that_returns_commits(engine: Engine) -> None:
    with driver_transaction(engine) as statements:
        DataKeyStore(statements, INTEGRITY).add_bindings([dict(zip(COLUMNS, BINDING, strict=True))])
    assert bindings(engine) == 1


def test_a_block_that_raises_rolls_back(engine: Engine) -> None:
    with pytest.raises(RuntimeError), driver_transaction(engine) as statements:
        DataKeyStore(statements, INTEGRITY).add_bindings([dict(zip(COLUMNS, BINDING, strict=True))])
        raise RuntimeError("after the insert")
    assert bindings(engine) == 0


def test_a_batch_of_any_size_is_inserted_whole(engine: Engine) -> None:
    # 100 rows: multi-row INSERTs of 64, 32 and 4 rows, each row where it belongs.
    rows = [
        dict(
            zip(
                COLUMNS,
                (f"backup-{n}", "tenant", 1, bytes([n]) * 60, n, False, "agent"),
                strict=True,
            )
        )
        for n in range(100)
    ]
    with driver_transaction(engine) as statements:
        DataKeyStore(statements, INTEGRITY).add_bindings(rows)
    with engine.connect() as connection:
        stored = connection.execute(
            text("SELECT backup_id, wrapped_data_key, created_us FROM backup_bindings")
        ).all()
    assert sorted((b, bytes(w), c) for b, w, c in stored) == sorted(
        (row["backup_id"], row["wrapped_data_key"], row["created_us"]) for row in rows
    )


def test_driver_errors_come_out_as_sqlalchemy_errors_without_parameters(engine: Engine) -> None:
    row = dict(zip(COLUMNS, BINDING, strict=True))
    with driver_transaction(engine) as statements:
        DataKeyStore(statements, INTEGRITY).add_bindings([row])
    with pytest.raises(sa_exc.IntegrityError) as raised, driver_transaction(engine) as statements:
        DataKeyStore(statements, INTEGRITY).add_bindings([row])
    assert "sentinel-7f3a" not in str(raised.value), "parameters stay out of error messages"
    assert not raised.value.connection_invalidated
    assert bindings(engine) == 1
    with driver_transaction(engine) as statements:  # the connection went back usable
        assert len(DataKeyStore(statements, INTEGRITY).bindings_by_backup_id({"backup-1"})) == 1


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_lost_connection_is_invalidated_and_replaced(engine: Engine) -> None:
    admin = create_engine(engine.url, poolclass=NullPool)  # not a connection of the pool's
    with pytest.raises(sa_exc.OperationalError) as raised, driver_transaction(engine) as statements:
        ((lost_pid,),) = statements.rows("SELECT pg_backend_pid()", ())
        with admin.connect() as connection:
            connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": lost_pid})
        statements.rows("SELECT 1", ())
    admin.dispose()
    assert raised.value.connection_invalidated, "an outage, and the connection is dropped"
    with driver_transaction(engine) as statements:
        ((pid,),) = statements.rows("SELECT pg_backend_pid()", ())
    assert pid != lost_pid


COLUMNS = (
    "backup_id",
    "key_name",
    "version",
    "wrapped_data_key",
    "created_us",
    "recovered",
    "created_by",
)
