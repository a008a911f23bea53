"""The audit hash chain, checked without a database."""

from __future__ import annotations

import dataclasses
from typing import Any

from server.domain.audit_chain import GENESIS_HASH, HASHED_FIELDS, event_hash, verify_chain
from server.domain.model import AuditEvent


def chain(length: int) -> list[AuditEvent]:
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
        events.append(AuditEvent(**fields, previous_hash=previous, event_hash=digest))  # type: ignore[arg-type]
        previous = digest
    return events


def head(events: list[AuditEvent]) -> tuple[int, str]:
    return (events[-1].sequence, events[-1].event_hash) if events else (0, GENESIS_HASH)


def test_an_intact_chain_verifies() -> None:
    events = chain(5)
    result = verify_chain(events, *head(events))
    assert (result.intact, result.events_checked, result.first_broken_sequence) == (True, 5, 0)
    assert result.head_hash == events[-1].event_hash
    assert result.problem == ""


def test_an_empty_log_is_intact() -> None:
    result = verify_chain([], 0, GENESIS_HASH)
    assert (result.intact, result.events_checked, result.head_hash) == (True, 0, GENESIS_HASH)


def test_every_hashed_field_is_covered() -> None:
    event = chain(1)[0]
    for name in HASHED_FIELDS:
        value = getattr(event, name)
        changed = value + 1 if isinstance(value, int) else value + "x"
        changes: dict[str, Any] = {name: changed}
        edited = dataclasses.replace(event, **changes)
        result = verify_chain([edited], 1, event.event_hash)
        assert (result.intact, result.first_broken_sequence) == (False, 1), name


def test_an_edited_event_is_reported_at_its_sequence() -> None:
    events = chain(5)
    events[2] = dataclasses.replace(events[2], actor="mallory")
    result = verify_chain(events, *head(chain(5)))
    assert (result.intact, result.first_broken_sequence, result.events_checked) == (False, 3, 2)
    assert "edited" in result.problem


def test_a_rehashed_edit_breaks_the_next_link() -> None:
    events = chain(5)
    forged = dataclasses.replace(events[2], actor="mallory")
    forged = dataclasses.replace(forged, event_hash=event_hash(forged.previous_hash, vars(forged)))
    events[2] = forged
    result = verify_chain(events, *head(chain(5)))
    assert (result.intact, result.first_broken_sequence) == (False, 4)
    assert "previous_hash" in result.problem


def test_a_deleted_event_is_reported_at_its_sequence() -> None:
    events = chain(5)
    original_head = head(events)
    del events[1]
    result = verify_chain(events, *original_head)
    assert (result.intact, result.first_broken_sequence) == (False, 2)


def test_swapped_events_are_caught() -> None:
    events = chain(5)
    original_head = head(events)
    events[1], events[2] = events[2], events[1]
    assert verify_chain(events, *original_head).first_broken_sequence == 2


def test_deleted_newest_events_are_caught_against_the_head() -> None:
    events = chain(5)
    result = verify_chain(events[:3], *head(events))
    assert (result.intact, result.first_broken_sequence, result.events_checked) == (False, 4, 3)
    assert "head" in result.problem


def test_a_head_that_does_not_match_the_last_hash_is_caught() -> None:
    events = chain(3)
    result = verify_chain(events, 3, "f" * 64)
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
