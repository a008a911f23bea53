"""VerifyAuditLog walks the chain in a read-only snapshot: it does not hold the write lock."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.conftest import RunningKms
from tests.integration.kms_helpers import issue, register, verify


def test_walking_the_chain_is_not_blocked_by_a_writer_on_sqlite(kms: RunningKms) -> None:
    if not kms.database_url.startswith("sqlite"):
        pytest.skip("the write lock is SQLite's")
    register(kms.stub("admin"), activate=True)
    for index in range(20):
        issue(kms.stub("backup"), f"b{index}")
    writer = sqlite3.connect(kms.database_url.split("///", 1)[1], isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        assert kms.server.service is not None
        started = time.monotonic()
        result = kms.server.service.audit._verify_in_snapshot()
        elapsed = time.monotonic() - started
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert result.intact and result.events_checked == 22  # keyed start, a registration, 20 keys
    # A write transaction would have waited out the 5 s busy timeout instead.
    assert elapsed < 2.5
    assert verify(kms).intact
