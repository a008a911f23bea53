"""Migration 0004 on a database that holds keys, versions and bindings: the key_versions
rebuild (SQLite) keeps every row and reference, the audit triggers stay, and it goes back."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from kms.v1 import kms_pb2
from server.db import migrate
from server.db.engine import make_engine
from tests.conftest import RunningKms, start_kms
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


def test_a_populated_database_goes_down_before_the_lifecycle_and_up_again(
    tmp_path: Path, database_url: str
) -> None:
    kms = start_kms(tmp_path / "kms", database_url, destroy_delay="1h")
    url = kms.database_url
    try:
        admin = kms.stub("admin")
        register(admin, activate=True)
        made = issue(kms.stub("backup"), "b-1")
        register(admin)
        rotate(admin, 2)
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
    again: RunningKms = start_kms(tmp_path / "kms", url, destroy_delay="1h")
    try:
        assert resolve(again.stub("restore"), "b-1").data_key == made.data_key
        scheduled = again.stub("admin").DestroyKeyVersion(
            kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=1)
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
