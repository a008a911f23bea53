"""An attacker who can write the database, but has no root key, against the keyed audit chain
and the authenticated state: each attack is what the issue reproduced, each is caught.

The attacker uses only public code: `kms_audit.chain.event_hash` to recompute hashes, and
SQL to drop or bypass the append-only triggers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import Connection, create_engine, text

from kms.v1 import kms_pb2
from kms_audit.chain import HASHED_FIELDS, event_hash
from server.keystore.crypto import RootKeyError
from tests.conftest import RunningKms, start_kms
from tests.integration.hardening_support import metric, scrape, snapshot
from tests.integration.kms_helpers import (
    KEY,
    code_of,
    database,
    drop_append_only_triggers,
    expect_error,
    is_postgres,
    issue,
    message_of,
    reason_of,
    register,
    resolve,
    rotate,
    verify,
)


def _events(connection: Connection) -> list[dict[str, Any]]:
    rows = connection.execute(text("SELECT * FROM audit_events ORDER BY sequence")).mappings()
    return [dict(row) for row in rows]


def _rehash_from(connection: Connection, events: list[dict[str, Any]], start: int) -> None:
    """Recomputes every hash from event `start` on and moves the head, as the attacker would."""
    previous = events[start - 2]["event_hash"] if start > 1 else "0" * 64
    for event in events[start - 1 :]:
        event["previous_hash"] = previous
        event["event_hash"] = event_hash(previous, event)
        previous = event["event_hash"]
        connection.execute(
            text(
                "UPDATE audit_events SET previous_hash = :previous_hash, event_hash = :event_hash,"
                " actor = :actor, reason = :reason WHERE sequence = :sequence"
            ),
            event,
        )
    last = events[-1]
    connection.execute(
        text("UPDATE audit_head SET sequence = :sequence, event_hash = :event_hash WHERE id = 1"),
        last,
    )


def _story(kms: RunningKms) -> int:
    """Register, rotate (the event the attacker rewrites), back up; returns the rotation's seq."""
    admin = kms.stub("admin")
    register(admin, activate=True)
    issue(kms.stub("backup"), "b-0")
    register(admin)
    rotation = rotate(admin, 2, reason="quarterly")
    issue(kms.stub("backup"), "b-1")
    return int(rotation.audit_sequence)


def test_rewriting_a_rotation_and_recomputing_every_hash_is_caught(kms: RunningKms) -> None:
    rotation = _story(kms)
    with database(kms) as connection:
        drop_append_only_triggers(connection)
        events = _events(connection)
        events[rotation - 1]["actor"] = "someone-else"
        events[rotation - 1]["reason"] = "approved by the board"
        _rehash_from(connection, events, rotation)
    result = verify(kms)
    assert not result.intact
    assert result.first_broken_sequence == rotation
    assert "MAC" in result.problem


def test_a_superuser_bypassing_the_triggers_is_caught(kms: RunningKms) -> None:
    rotation = _story(kms)
    with database(kms) as connection:
        if not is_postgres(connection):
            pytest.skip("session_replication_role is PostgreSQL's")
        connection.execute(text("SET session_replication_role = replica"))
        events = _events(connection)
        events[rotation - 1]["reason"] = "nothing to see"
        _rehash_from(connection, events, rotation)
    result = verify(kms)
    assert (result.intact, result.first_broken_sequence) == (False, rotation)


def test_deleting_the_newest_events_to_hide_a_destroy_is_caught(kms: RunningKms) -> None:
    _story(kms)
    admin = kms.stub("admin")
    admin.DestroyKeyVersion(kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=1))
    with database(kms) as connection:
        drop_append_only_triggers(connection)
        events = _events(connection)
        destroy = next(e for e in events if e["action"] == "key_version.destroy")
        connection.execute(
            text("DELETE FROM audit_events WHERE sequence >= :s"), {"s": destroy["sequence"]}
        )
        kept = [e for e in events if e["sequence"] < destroy["sequence"]]
        _rehash_from(connection, kept, len(kept))
    result = verify(kms)
    assert not result.intact
    assert "head" in result.problem


def test_a_forged_event_with_a_correct_hash_is_caught(kms: RunningKms) -> None:
    """What the least-privileged role (INSERT, UPDATE) can do: append and move the head."""
    _story(kms)
    with database(kms) as connection:
        events = _events(connection)
        last = events[-1]
        forged = {
            **last,
            "sequence": last["sequence"] + 1,
            "actor": "ops-admin",
            "action": "key.rotate",
            "reason": "forged",
            "previous_hash": last["event_hash"],
        }
        forged["event_hash"] = event_hash(forged["previous_hash"], forged)
        columns = [*HASHED_FIELDS, "previous_hash", "event_hash"]
        connection.execute(
            text(
                f"INSERT INTO audit_events ({', '.join(columns)}) "
                f"VALUES ({', '.join(':' + c for c in columns)})"
            ),
            forged,
        )
        connection.execute(
            text("UPDATE audit_head SET sequence = :sequence, event_hash = :event_hash"), forged
        )
    result = verify(kms)
    assert (result.intact, result.first_broken_sequence) == (False, forged["sequence"])
    assert "MAC" in result.problem


def test_changing_the_active_version_behind_the_servers_back_issues_nothing(
    kms: RunningKms,
) -> None:
    _story(kms)
    with database(kms) as connection:
        connection.execute(text("UPDATE keys SET active_version = 1 WHERE name = :k"), {"k": KEY})
    before = snapshot(kms)
    error = expect_error(lambda: issue(kms.stub("backup"), "b-2"), grpc.StatusCode.DATA_LOSS)
    assert reason_of(error) == "STATE_INTEGRITY"
    assert f"key {KEY}" in message_of(error)
    assert snapshot(kms) == before  # no binding, nothing else
    # Admin calls refuse the row too, and VerifyAuditLog names it.
    expect_error(
        lambda: kms.stub("admin").ListKeyVersions(kms_pb2.ListKeyVersionsRequest(key_name=KEY)),
        grpc.StatusCode.DATA_LOSS,
    )
    result = verify(kms)
    assert not result.intact and f"key {KEY}" in result.problem


def test_reenabling_a_disabled_version_in_the_database_resolves_nothing(kms: RunningKms) -> None:
    _story(kms)
    admin = kms.stub("admin")
    admin.DisableKeyVersion(kms_pb2.DisableKeyVersionRequest(key_name=KEY, version=1))
    with database(kms) as connection:
        connection.execute(
            text("UPDATE key_versions SET state = 'enabled' WHERE key_name = :k AND version = 1"),
            {"k": KEY},
        )
    error = expect_error(lambda: resolve(kms.stub("restore"), "b-0"), grpc.StatusCode.DATA_LOSS)
    assert reason_of(error) == "STATE_INTEGRITY"
    assert f"{KEY} version 1" in message_of(error)


def test_putting_back_an_older_validly_sealed_row_is_caught_by_verification(
    kms: RunningKms,
) -> None:
    """A rollback: the row and its MAC as they were before the rotation, copied back."""
    admin = kms.stub("admin")
    register(admin, activate=True)
    register(admin)
    with database(kms) as connection:
        old = connection.execute(
            text("SELECT active_version, state_sequence, mac FROM keys WHERE name = :k"),
            {"k": KEY},
        ).one()
    rotation = rotate(admin, 2)
    with database(kms) as connection:
        connection.execute(
            text(
                "UPDATE keys SET active_version = :a, state_sequence = :s, mac = :m WHERE name = :k"
            ),
            {"a": old[0], "s": old[1], "m": old[2], "k": KEY},
        )
    result = verify(kms)
    assert not result.intact
    assert f"key {KEY}" in result.problem
    assert f"event {rotation.audit_sequence}" in result.problem


def _stopped_server_database(tmp_path: Path, database_url: str) -> RunningKms:
    kms = start_kms(tmp_path / "kms", database_url)
    _story(kms)
    kms.close()
    return kms


def test_a_server_whose_secrets_were_deleted_refuses_to_start(
    tmp_path: Path, database_url: str
) -> None:
    kms = _stopped_server_database(tmp_path, database_url)
    with database(kms) as connection:
        connection.execute(
            text(
                "DELETE FROM server_meta WHERE name IN "
                "('audit_mac_key', 'state_mac_key', 'audit_signing_key', 'audit_keyed_from')"
            )
        )
    with pytest.raises(RootKeyError, match="were deleted"):
        start_kms(kms.data_dir, database_url)


def test_a_moved_start_of_the_keyed_chain_stops_the_server_at_start(
    tmp_path: Path, database_url: str
) -> None:
    """Moving where the keyed part begins would let old events go unchecked."""
    kms = _stopped_server_database(tmp_path, database_url)
    with database(kms) as connection:
        connection.execute(
            text("UPDATE server_meta SET value = :v WHERE name = 'audit_keyed_from'"),
            {"v": b"1000"},
        )
    with pytest.raises(RootKeyError, match="altered"):
        start_kms(kms.data_dir, database_url)


def test_the_least_privileged_role_cannot_forge_undetected(kms: RunningKms) -> None:
    """The grants docs/operations.md gives the service's own role: SELECT, INSERT, UPDATE."""
    _story(kms)
    with database(kms) as connection:
        if not is_postgres(connection):
            pytest.skip("roles are PostgreSQL's")
        role = f"kms_app_{connection.engine.url.database}"
        connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        connection.execute(
            text(f'GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO "{role}"')
        )
    url = kms.database_url.replace("postgres@", f"{role}@", 1)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE keys SET active_version = 1"))
    finally:
        engine.dispose()
    error = expect_error(lambda: issue(kms.stub("backup"), "b-3"), grpc.StatusCode.DATA_LOSS)
    assert code_of(error) == grpc.StatusCode.DATA_LOSS
    assert not verify(kms).intact
    with database(kms) as connection:
        connection.execute(text(f'DROP OWNED BY "{role}"'))
        connection.execute(text(f'DROP ROLE "{role}"'))


def test_a_tampered_row_is_logged_and_counted(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    kms = start_kms(tmp_path / "kms", database_url, metrics_listen="127.0.0.1:0")
    try:
        _story(kms)
        with database(kms) as connection:
            connection.execute(text("UPDATE keys SET last_version = 9"))
        expect_error(lambda: issue(kms.stub("backup"), "b-9"), grpc.StatusCode.DATA_LOSS)
        samples = scrape(kms)
        assert metric(samples, "kms_integrity_failures_total", reason="STATE_INTEGRITY") == 1
        assert any("STATE_INTEGRITY" in record.getMessage() for record in caplog.records)
    finally:
        kms.close()


def test_rewriting_who_made_a_binding_hands_out_no_data_key(kms: RunningKms) -> None:
    """A binding's creator decides who may get its data key again (a retry): an attacker who
    makes it theirs, and fresh, in the database must get nothing."""
    register(kms.stub("admin"), activate=True)
    issue(kms.stub("backup"), "b-victim")
    # Made by dev-backup (so its own retry is what the attacker borrows) and fresh forever.
    with database(kms) as connection:
        connection.execute(
            text("UPDATE backup_bindings SET created_us = :now WHERE backup_id = :b"),
            {"b": "b-victim", "now": 2**62},
        )
    error = expect_error(lambda: issue(kms.stub("backup"), "b-victim"), grpc.StatusCode.DATA_LOSS)
    assert reason_of(error) == "STATE_INTEGRITY"
    assert "binding of backup b-victim" in message_of(error)
