"""Migration 0004 on a database that holds keys, versions and bindings: the key_versions
rebuild (SQLite) keeps every row and reference, the audit triggers stay, and it goes back.
And 0005 refuses to go back once a version has counted the data keys it wrapped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from kms.v1 import kms_pb2
from server.db import migrate
from server.db.engine import make_engine
from tests.conftest import RunningKms, fresh_postgres_database, start_kms
from tests.integration.kms_helpers import (
    KEY,
    database,
    drop_append_only_triggers,
    issue,
    register,
    resolve,
    rotate,
    verify,
)
from tests.integration.legacy_fixture import legacy_data_dir, load_into_postgres

LEGACY_KEY = "legacy"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def legacy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """An older server's data directory, and its PostgreSQL database ("" on SQLite)."""
    data_dir = legacy_data_dir(tmp_path)
    if request.param == "sqlite":
        yield data_dir, ""
        return
    postgres = fresh_postgres_database()
    url = next(postgres)
    load_into_postgres(data_dir / "kms.sqlite3", url)
    yield data_dir, url
    next(postgres, None)


def test_a_populated_database_goes_down_before_the_lifecycle_and_up_again(
    legacy: tuple[Path, str],
) -> None:
    # Bindings made by an older server: no version has counted a data key yet, so the
    # database can go back below 0005 (and 0004) and up again.
    data_dir, database_url = legacy
    kms = start_kms(data_dir, database_url, destroy_delay="1h")
    url = kms.database_url
    try:
        made = resolve(kms.stub("restore"), "old-backup-1")
    finally:
        kms.close()
    engine = make_engine(url)
    try:
        migrate.downgrade(engine, "0003")
        with engine.connect() as connection:
            columns = connection.execute(text("SELECT * FROM key_versions")).keys()
            assert "destroy_due_us" not in columns
        migrate.upgrade(engine)  # foreign keys checked after each rebuild
    finally:
        engine.dispose()
    again: RunningKms = start_kms(data_dir, url, destroy_delay="1h")
    try:
        assert resolve(again.stub("restore"), "old-backup-1").data_key == made.data_key
        scheduled = again.stub("admin").DestroyKeyVersion(
            kms_pb2.DestroyKeyVersionRequest(key_name=LEGACY_KEY, version=1)
        )
        assert scheduled.key_version.state == kms_pb2.KEY_VERSION_STATE_DESTROY_SCHEDULED
        assert verify(again).intact
        # The append-only triggers survived the rebuild of key_versions.
        with pytest.raises(Exception, match=r"append-only|audit"), database(again) as connection:
            connection.execute(text("UPDATE audit_events SET detail = 'x'"))
        with database(again) as connection:
            drop_append_only_triggers(connection)  # they existed to be dropped
    finally:
        again.close()


def test_a_database_whose_versions_counted_data_keys_does_not_go_below_0005(
    tmp_path: Path, database_url: str
) -> None:
    kms = start_kms(tmp_path / "kms", database_url)
    url = kms.database_url
    try:
        register(kms.stub("admin"), activate=True)
        made = issue(kms.stub("backup"), "b-1")
        register(kms.stub("admin"))
        rotate(kms.stub("admin"), 2)
    finally:
        kms.close()
    engine = make_engine(url)
    try:
        with pytest.raises(RuntimeError, match="cannot downgrade below revision 0005: 1 key"):
            migrate.downgrade(engine, "0004")
    finally:
        engine.dispose()
    again = start_kms(tmp_path / "kms", url)
    try:  # nothing was lost on the way
        assert resolve(again.stub("restore"), "b-1").data_key == made.data_key
        assert verify(again).intact
        with database(again) as connection:
            counted = connection.execute(
                text("SELECT data_keys_wrapped FROM key_versions WHERE key_name = :k"),
                {"k": KEY},
            ).scalars()
            assert sorted(counted) == [0, 1]
    finally:
        again.close()
