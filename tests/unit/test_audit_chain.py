"""The audit hash chain and its MACs, checked without a database."""

from __future__ import annotations

import dataclasses
from typing import Any

from server.domain.audit_chain import GENESIS_HASH, HASHED_FIELDS, event_hash, verify_chain
from server.domain.integrity import AuditMac
from server.domain.model import AuditEvent, AuditHead, AuditVerification

MAC = AuditMac(b"k" * 32)


def chain(length: int, keyed_from: int = 1) -> list[AuditEvent]:
    events = []
    previous = GENESIS_HASH
    for sequence in range(1, length + 1):
        fields: dict[str, object] = {
            "sequence": sequence,
            "time_us": 1_700_000_000_000_000 + sequence,
            "actor": "dev-admin",
            "action": "key.rotate",
            "outcome": "allowed",
            "status_code": "OK",
            "key_name": "tenant-a",
            "version": 0,
            "from_version": sequence - 1,
            "to_version": sequence,
            "backup_id": "",
            "reason": "rotation ünïcode",
            "detail": "",
        }
        digest = event_hash(previous, fields)
        mac = MAC.event(sequence, digest) if sequence >= keyed_from else None
        events.append(AuditEvent(**fields, previous_hash=previous, event_hash=digest, mac=mac))  # type: ignore[arg-type]
        previous = digest
    return events


def head(events: list[AuditEvent]) -> AuditHead:
    if not events:
        return AuditHead(0, GENESIS_HASH, None)
    last = events[-1]
    return AuditHead(last.sequence, last.event_hash, MAC.head(last.sequence, last.event_hash))


def check(
    events: list[AuditEvent], at: AuditHead, keyed_from: int = 1, mac: AuditMac = MAC
) -> AuditVerification:
    return verify_chain(events, at, mac, keyed_from)


def test_an_intact_chain_verifies() -> None:
    events = chain(5)
    result = check(events, head(events))
    assert (result.intact, result.events_checked, result.first_broken_sequence) == (True, 5, 0)
    assert result.head_hash == events[-1].event_hash
    assert result.problem == ""


def test_an_empty_log_is_broken_once_keyed() -> None:
    """A keyed log begins with the event that started it: an empty one lost everything."""
    result = check([], AuditHead(0, GENESIS_HASH, None))
    assert (result.intact, result.first_broken_sequence) == (False, 1)
    assert "before its keyed part begins" in result.problem


def test_every_hashed_field_is_covered() -> None:
    event = chain(1)[0]
    for name in HASHED_FIELDS:
        value = getattr(event, name)
        changed = value + 1 if isinstance(value, int) else value + "x"
        changes: dict[str, Any] = {name: changed}
        edited = dataclasses.replace(event, **changes)
        result = check([edited], head([event]))
        assert (result.intact, result.first_broken_sequence) == (False, 1), name


def test_an_edited_event_is_reported_at_its_sequence() -> None:
    events = chain(5)
    events[2] = dataclasses.replace(events[2], actor="mallory")
    result = check(events, head(chain(5)))
    assert (result.intact, result.first_broken_sequence, result.events_checked) == (False, 3, 2)
    assert "edited" in result.problem


def test_a_rehashed_edit_breaks_its_mac_and_in_the_unkeyed_part_the_next_link() -> None:
    events = chain(5, keyed_from=6)
    forged = dataclasses.replace(events[2], actor="mallory")
    forged = dataclasses.replace(forged, event_hash=event_hash(forged.previous_hash, vars(forged)))
    events[2] = forged
    result = check(events, head(chain(5, keyed_from=6)), keyed_from=6)
    assert (result.intact, result.first_broken_sequence) == (False, 4)
    assert "previous_hash" in result.problem
    keyed = chain(5)
    keyed[2] = dataclasses.replace(forged, mac=keyed[2].mac)
    result = check(keyed, head(chain(5)))
    assert (result.intact, result.first_broken_sequence) == (False, 3)
    assert "MAC" in result.problem


def test_a_deleted_event_is_reported_at_its_sequence() -> None:
    events = chain(5)
    original_head = head(events)
    del events[1]
    result = check(events, original_head)
    assert (result.intact, result.first_broken_sequence) == (False, 2)


def test_swapped_events_are_caught() -> None:
    events = chain(5)
    original_head = head(events)
    events[1], events[2] = events[2], events[1]
    assert check(events, original_head).first_broken_sequence == 2


def test_deleted_newest_events_are_caught_against_the_head() -> None:
    events = chain(5)
    result = check(events[:3], head(events))
    assert (result.intact, result.first_broken_sequence, result.events_checked) == (False, 4, 3)
    assert "head" in result.problem


def test_a_head_that_does_not_match_the_last_hash_is_caught() -> None:
    events = chain(3)
    result = check(events, AuditHead(3, "f" * 64, MAC.head(3, "f" * 64)))
    assert (result.intact, result.first_broken_sequence) == (False, 4)


def test_the_hash_depends_on_the_previous_hash() -> None:
    event = chain(1)[0]
    fields = vars(event)
    assert event_hash(GENESIS_HASH, fields) != event_hash("1" * 64, fields)
    assert len(event_hash(GENESIS_HASH, fields)) == 64


def test_the_hash_format_is_stable() -> None:
    """Stored chains must keep verifying: this digest was computed by the first release."""
    fields = dict(
        sequence=1,
        time_us=1_700_000_000_000_000,
        actor="admin",
        action="key.rotate",
        outcome="ALLOWED",
        status_code="OK",
        key_name="tenant",
        version=0,
        from_version=1,
        to_version=2,
        backup_id="",
        reason="quarterly \u2013 \u00fc",
        detail="",
    )
    assert event_hash(GENESIS_HASH, fields) == (
        "26f6a55ce3b5a4fa1d42c449d7a2f0a7da185db3dbf60b085a19a3063e12bea0"
    )


def test_a_rehashed_chain_without_the_mac_key_is_caught_at_the_first_forged_event() -> None:
    events = chain(5)
    forged = chain(5)[:2]
    previous = forged[-1].event_hash
    for event in events[2:]:
        edited = dataclasses.replace(event, actor="mallory", previous_hash=previous)
        edited = dataclasses.replace(edited, event_hash=event_hash(previous, vars(edited)))
        forged.append(edited)
        previous = edited.event_hash
    result = check(forged, AuditHead(5, previous, "0" * 64))
    assert (result.intact, result.first_broken_sequence) == (False, 3)
    assert "MAC" in result.problem


def test_a_missing_mac_in_the_keyed_part_is_caught() -> None:
    events = chain(4)
    events[1] = dataclasses.replace(events[1], mac=None)
    assert check(events, head(events)).first_broken_sequence == 2


def test_a_head_moved_without_the_key_is_caught() -> None:
    events = chain(4)
    moved = AuditHead(3, events[2].event_hash, head(events).mac)  # the old MAC, a new place
    result = check(events[:3], moved)
    assert not result.intact and "head's MAC" in result.problem


def test_events_before_the_keyed_part_need_no_mac() -> None:
    events = chain(6, keyed_from=4)
    result = check(events, head(events), keyed_from=4)
    assert (result.intact, result.keyed_from_sequence) == (True, 4)
    assert check(events, head(events), keyed_from=3).first_broken_sequence == 3


def test_another_servers_mac_key_does_not_verify() -> None:
    events = chain(3)
    assert not check(events, head(events), mac=AuditMac(b"x" * 32)).intact


def test_the_verifier_outside_the_server_hashes_alike() -> None:
    """kms_audit is the one definition; the server's names are the same objects."""
    import kms_audit.chain

    assert event_hash is kms_audit.chain.event_hash
    assert HASHED_FIELDS is kms_audit.chain.HASHED_FIELDS
