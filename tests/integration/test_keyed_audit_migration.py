"""A database made before the keyed audit chain (tests/fixtures/pre_keyed_audit), upgraded:
old events stay as they were, the first keyed event anchors the old head, and verification
says where the keyed part begins. On SQLite as the old server left it, and on PostgreSQL
with the same rows loaded at schema revision 0001."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from kms_audit.chain import event_hash
from server.db.migrate import alembic_config
from tests.conftest import REPO, RunningKms, fresh_postgres_database, start_kms
from tests.integration.kms_helpers import (
    all_audit_events,
    database,
    drop_append_only_triggers,
    issue,
    resolve,
    verify,
)

FIXTURE = REPO / "tests" / "fixtures" / "pre_keyed_audit"
LEGACY_EVENTS = 8  # the last one: the VerifyAuditLog that checked the old chain
# Parents before children, so foreign keys hold at every insert.
TABLES = ("server_meta", "keys", "key_versions", "backup_bindings", "audit_events")


def _legacy_data_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "kms"
    data_dir.mkdir(mode=0o700)
    shutil.copy(FIXTURE / "kms.sqlite3", data_dir / "kms.sqlite3")
    shutil.copy(FIXTURE / "root.key", data_dir / "root.key")
    (data_dir / "root.key").chmod(0o600)  # git keeps no mode bits but the executable one
    return data_dir


def _load_into_postgres(sqlite_file: Path, postgres_url: str) -> None:
    """The old rows in a PostgreSQL database at revision 0001, as a replica set would have."""
    engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    source = create_engine(f"sqlite:///{sqlite_file}")
    with source.connect() as old, engine.begin() as new:
        new.execute(text("DELETE FROM audit_head"))
        for table in (*TABLES, "audit_head"):
            rows = [dict(row) for row in old.execute(text(f"SELECT * FROM {table}")).mappings()]
            if table == "keys":
                actives = {row["name"]: row["active_version"] for row in rows}
                rows = [{**row, "active_version": None} for row in rows]
            if table == "backup_bindings":
                rows = [{**row, "recovered": bool(row["recovered"])} for row in rows]
            if rows:
                columns = list(rows[0])
                new.execute(
                    text(
                        f"INSERT INTO {table} ({', '.join(columns)}) "
                        f"VALUES ({', '.join(':' + c for c in columns)})"
                    ),
                    rows,
                )
            if table == "key_versions":
                for name, active in actives.items():
                    new.execute(
                        text("UPDATE keys SET active_version = :a WHERE name = :n"),
                        {"a": active, "n": name},
                    )
    source.dispose()
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def upgraded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningKms]:
    data_dir = _legacy_data_dir(tmp_path)
    url = ""
    postgres: Iterator[str] | None = None
    if request.param == "postgres":
        postgres = fresh_postgres_database()
        url = next(postgres)
        _load_into_postgres(data_dir / "kms.sqlite3", url)
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
