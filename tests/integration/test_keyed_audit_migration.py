"""A database made before the keyed audit chain (tests/fixtures/pre_keyed_audit), upgraded:
old events stay as they were, the first keyed event anchors the old head, and verification
says where the keyed part begins. On SQLite as the old server left it, and on PostgreSQL
with the same rows loaded at schema revision 0001."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from kms_audit.chain import event_hash
from tests.conftest import RunningKms, fresh_postgres_database, start_kms
from tests.integration.kms_helpers import (
    all_audit_events,
    database,
    drop_append_only_triggers,
    issue,
    resolve,
    verify,
)
from tests.integration.legacy_fixture import LEGACY_EVENTS, legacy_data_dir, load_into_postgres


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def upgraded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningKms]:
    data_dir = legacy_data_dir(tmp_path)
    url = ""
    postgres: Iterator[str] | None = None
    if request.param == "postgres":
        postgres = fresh_postgres_database()
        url = next(postgres)
        load_into_postgres(data_dir / "kms.sqlite3", url)
    kms = start_kms(data_dir, url)
    try:
        yield kms
    finally:
        kms.close()
        if postgres is not None:
            next(postgres, None)


def test_an_upgraded_database_keeps_its_old_events_and_starts_the_keyed_chain_after_them(
    upgraded: RunningKms,
) -> None:
    result = verify(upgraded)
    assert result.intact, result.problem
    assert result.keyed_from_sequence == LEGACY_EVENTS + 1
    events = all_audit_events(upgraded.stub("auditor"))
    assert all(not e.mac for e in events[:LEGACY_EVENTS])
    anchor = events[LEGACY_EVENTS]
    assert anchor.action == "audit.keyed_chain_start" and anchor.mac
    assert anchor.previous_hash == events[LEGACY_EVENTS - 1].event_hash
    assert "sealed 1 keys and 3 versions" in anchor.detail
    assert all(e.mac for e in events[LEGACY_EVENTS:])


def test_backups_made_before_the_upgrade_still_resolve(upgraded: RunningKms) -> None:
    restore = upgraded.stub("restore")
    assert resolve(restore, "old-backup-1").version == 1
    assert resolve(restore, "old-backup-2").version == 2
    assert issue(upgraded.stub("backup"), "new-backup", key="legacy").version == 2
    assert verify(upgraded).intact


def test_rewriting_the_old_unkeyed_part_is_caught_at_the_anchor(upgraded: RunningKms) -> None:
    with database(upgraded) as connection:
        drop_append_only_triggers(connection)
        rows = [
            dict(row)
            for row in connection.execute(
                text("SELECT * FROM audit_events ORDER BY sequence")
            ).mappings()
        ]
        rows[3]["reason"] = "rewritten"  # the rotation, before the keyed chain
        previous = rows[2]["event_hash"]
        for row in rows[3:LEGACY_EVENTS]:
            row["previous_hash"] = previous
            row["event_hash"] = previous = event_hash(previous, row)
            connection.execute(
                text(
                    "UPDATE audit_events SET reason = :reason, previous_hash = :previous_hash,"
                    " event_hash = :event_hash WHERE sequence = :sequence"
                ),
                row,
            )
    result = verify(upgraded)
    assert not result.intact
    assert result.first_broken_sequence == LEGACY_EVENTS + 1
