"""The audit log through the gRPC API: append-only in the database, hash-chained, paginated.

Tampering is simulated the way an attacker with database access (and no
root key) would do it: drop the append-only trigger, then edit or delete rows.
"""

from __future__ import annotations

import itertools

import grpc
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from kms.v1 import kms_pb2
from server.domain.audit_chain import GENESIS_HASH, event_hash
from tests.conftest import RunningKms
from tests.integration.kms_helpers import (
    KEY,
    all_audit_events,
    database,
    drop_append_only_triggers,
    expect_error,
    is_postgres,
    issue,
    register,
    resolve,
    rotate,
    verify,
)


def some_history(kms: RunningKms) -> int:
    """Registers, rotates, issues and resolves; returns the number of audit events (the first,
    written at the server's first start, begins the keyed chain)."""
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    issue(backup, "b1")
    register(admin)
    rotate(admin, 2, reason="scheduled")
    issue(backup, "b2")
    resolve(restore, "b1")
    register(admin, "other-key", activate=True)
    issue(backup, "b3", "other-key")
    return 9


def newest_sequence(kms: RunningKms) -> int:
    with database(kms) as connection:
        return int(connection.execute(text("SELECT max(sequence) FROM audit_events")).scalar_one())


# Append-only in the database itself


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET actor = 'someone-else' WHERE sequence = 1",
        "DELETE FROM audit_events WHERE sequence = 1",
        "DELETE FROM audit_events",
    ],
)
def test_the_database_refuses_to_edit_or_delete_audit_rows(kms: RunningKms, statement: str) -> None:
    some_history(kms)
    with pytest.raises(sa_exc.DBAPIError) as caught, database(kms) as connection:
        connection.execute(text(statement))
    assert "append-only" in str(caught.value)
    result = verify(kms)
    assert result.intact, result.problem


def test_postgres_refuses_to_truncate_audit_rows(kms: RunningKms) -> None:
    some_history(kms)
    with database(kms) as connection:
        if not is_postgres(connection):
            pytest.skip("TRUNCATE is PostgreSQL's")
    with pytest.raises(sa_exc.DBAPIError) as caught, database(kms) as connection:
        connection.execute(text("TRUNCATE audit_events"))
    assert "append-only" in str(caught.value)


# VerifyAuditLog


def test_an_intact_log_verifies_and_reports_its_head(kms: RunningKms) -> None:
    count = some_history(kms)
    result = verify(kms)
    assert result.intact
    assert (result.first_broken_sequence, result.problem) == (0, "")
    assert result.events_checked == count
    events = all_audit_events(kms.stub("auditor"))
    assert result.head_hash == events[count - 1].event_hash
    verification = events[-1]
    assert (verification.action, verification.actor) == ("audit.verify", "dev-auditor")


def test_events_form_a_hash_chain_from_the_genesis_hash(kms: RunningKms) -> None:
    some_history(kms)
    events = all_audit_events(kms.stub("auditor"))
    assert events[0].previous_hash == GENESIS_HASH
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    for before, after in itertools.pairwise(events):
        assert after.previous_hash == before.event_hash
    assert len({e.event_hash for e in events}) == len(events)


@pytest.mark.parametrize(
    "assignment",
    [
        "actor = 'someone-else'",
        "outcome = 'denied'",
        "to_version = 1",
        "time_us = time_us + 1",
        "reason = ''",
        "detail = 'nothing to see'",
    ],
)
def test_an_edited_audit_row_is_caught_at_its_sequence(kms: RunningKms, assignment: str) -> None:
    some_history(kms)
    rotation = next(e for e in all_audit_events(kms.stub("auditor")) if e.action == "key.rotate")
    with database(kms) as connection:
        drop_append_only_triggers(connection)
        edited = connection.execute(
            text(f"UPDATE audit_events SET {assignment} WHERE sequence = :s"),
            {"s": rotation.sequence},
        )
        assert edited.rowcount == 1
    result = verify(kms)
    assert not result.intact
    assert result.first_broken_sequence == rotation.sequence
    assert result.events_checked == rotation.sequence - 1
    assert result.problem
    # The server keeps serving, and keeps reporting the break.
    issue(kms.stub("backup"), "after-tampering")
    assert verify(kms).first_broken_sequence == rotation.sequence


def test_an_edit_that_recomputes_its_own_hash_fails_its_mac(kms: RunningKms) -> None:
    some_history(kms)
    with database(kms) as connection:
        drop_append_only_triggers(connection)
        row = dict(
            connection.execute(text("SELECT * FROM audit_events WHERE sequence = 3")).one()._mapping
        )
        row["actor"] = "someone-else"
        forged = event_hash(row["previous_hash"], row)
        connection.execute(
            text("UPDATE audit_events SET actor = :a, event_hash = :h WHERE sequence = 3"),
            {"a": row["actor"], "h": forged},
        )
    result = verify(kms)
    assert (result.intact, result.first_broken_sequence) == (False, 3)
    assert "MAC" in result.problem


def test_a_deleted_audit_row_is_caught_at_its_sequence(kms: RunningKms) -> None:
    some_history(kms)
    with database(kms) as connection:
        drop_append_only_triggers(connection)
        connection.execute(text("DELETE FROM audit_events WHERE sequence = 4"))
    result = verify(kms)
    assert (result.intact, result.first_broken_sequence, result.events_checked) == (False, 4, 3)


def test_a_deleted_newest_audit_row_is_caught(kms: RunningKms) -> None:
    count = some_history(kms)
    with database(kms) as connection:
        drop_append_only_triggers(connection)
        connection.execute(text("DELETE FROM audit_events WHERE sequence = :s"), {"s": count})
    result = verify(kms)
    assert not result.intact
    assert result.first_broken_sequence == count
    assert result.events_checked == count - 1


def test_deleting_the_newest_rows_is_caught_even_with_nothing_after_them(
    kms: RunningKms,
) -> None:
    """The verification's own audit event comes after the check: the tail is checked as found."""
    count = some_history(kms)
    with database(kms) as connection:
        drop_append_only_triggers(connection)
        connection.execute(text("DELETE FROM audit_events WHERE sequence > 5"))
    result = verify(kms)
    assert (result.intact, result.first_broken_sequence, result.events_checked) == (False, 6, 5)
    assert str(count) in result.problem


# ListAuditEvents


def test_audit_events_page_through_with_page_tokens(kms: RunningKms) -> None:
    count = some_history(kms)
    auditor = kms.stub("auditor")
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = auditor.ListAuditEvents(
            kms_pb2.ListAuditEventsRequest(page_size=3, page_token=token)
        )
        assert len(page.events) <= 3
        seen.extend(e.sequence for e in page.events)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    # Each listing is itself audited, after it reads: the log grows as we page.
    assert seen == list(range(1, len(seen) + 1))
    assert len(seen) >= count
    assert pages >= 3


def test_the_default_page_size_is_100(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    for _ in range(105):
        admin.ListKeys(kms_pb2.ListKeysRequest())
    page = kms.stub("auditor").ListAuditEvents(kms_pb2.ListAuditEventsRequest())
    assert len(page.events) == 100
    assert page.next_page_token


def test_audit_events_filter_by_key_name(kms: RunningKms) -> None:
    some_history(kms)
    auditor = kms.stub("auditor")
    other = all_audit_events(auditor, "other-key")
    assert [e.action for e in other] == ["key_version.register", "data_key.issue"]
    assert all(e.key_name == "other-key" for e in other)
    mine = all_audit_events(auditor, KEY)
    assert {e.key_name for e in mine} == {KEY}
    assert len(mine) == 6
    first = auditor.ListAuditEvents(kms_pb2.ListAuditEventsRequest(page_size=4, key_name=KEY))
    rest = auditor.ListAuditEvents(
        kms_pb2.ListAuditEventsRequest(page_size=4, key_name=KEY, page_token=first.next_page_token)
    )
    # Listing the log of a key is itself audited under that key: the log grows as we page.
    paged = [*first.events, *rest.events]
    assert [e.sequence for e in paged[: len(mine)]] == [e.sequence for e in mine]
    assert {e.action for e in paged[len(mine) :]} <= {"audit.list"}


@pytest.mark.parametrize(
    "page_token",
    ["abc", "-1", "1.5", " 1", "²", "١٢", "99999999999999999999", "1" * 21],
)
def test_audit_page_tokens_the_server_never_issued_are_invalid(
    kms: RunningKms, page_token: str
) -> None:
    some_history(kms)
    expect_error(
        lambda: kms.stub("auditor").ListAuditEvents(
            kms_pb2.ListAuditEventsRequest(page_token=page_token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
    )


def test_an_invalid_key_name_filter_is_refused(kms: RunningKms) -> None:
    expect_error(
        lambda: kms.stub("auditor").ListAuditEvents(
            kms_pb2.ListAuditEventsRequest(key_name="bad name")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "KEY_NAME_INVALID",
    )


# ListKeys pagination


def test_keys_page_through_by_name(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    names = [f"key-{n:02d}" for n in range(7)]
    for name in reversed(names):
        register(admin, name)
    register(admin, "key-03", activate=False)
    listed = []
    token = ""
    while True:
        page = admin.ListKeys(kms_pb2.ListKeysRequest(page_size=3, page_token=token))
        listed.extend(page.keys)
        token = page.next_page_token
        if not token:
            break
    assert [k.name for k in listed] == names
    assert {k.name: k.version_count for k in listed}["key-03"] == 2
    assert all(k.active_version == 0 for k in listed)


@pytest.mark.parametrize("page_token", ["zz", "abc", "ff", "c3", "00", "2d2d"])
def test_key_page_tokens_the_server_never_issued_are_invalid(
    kms: RunningKms, page_token: str
) -> None:
    expect_error(
        lambda: kms.stub("admin").ListKeys(kms_pb2.ListKeysRequest(page_token=page_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
    )
