"""The audit log's chain: public SHA-256 links, and keyed MACs from the keyed part on.

Each event's hash covers the previous hash and its own fields (`kms_audit.chain`), so
anyone can check that the log hangs together. From `keyed_from` on (the first event
written by a server with an audit MAC key) each event and the head also carry a MAC
that only the server can make, so an edited, inserted or deleted event cannot be
covered up by recomputing the hashes.
"""

from __future__ import annotations

from collections.abc import Iterable

from kms_audit.chain import GENESIS_HASH, HASHED_FIELDS, event_hash
from server.domain.integrity import AuditMac
from server.domain.model import AuditEvent, AuditHead, AuditVerification

__all__ = ["GENESIS_HASH", "HASHED_FIELDS", "event_hash", "verify_chain"]


def verify_chain(
    events: Iterable[AuditEvent], head: AuditHead, mac: AuditMac, keyed_from: int
) -> AuditVerification:
    """Walks the log in sequence order and reports the first link or MAC that does not hold.

    Editing a row breaks its own hash; deleting or reordering rows breaks the sequence or
    the next row's `previous_hash`; recomputing the hashes after any of these breaks the
    MACs; deleting the newest rows no longer matches the MAC'd head.
    """
    expected_previous = GENESIS_HASH
    expected_sequence = 1
    checked = 0
    for event in events:
        problem = ""
        if event.sequence != expected_sequence:
            problem = f"expected event {expected_sequence} but found event {event.sequence}"
        elif event.previous_hash != expected_previous:
            problem = "previous_hash does not match the hash of the event before it"
        elif event_hash(event.previous_hash, vars(event)) != event.event_hash:
            problem = "event fields do not match its hash (the row was edited)"
        elif event.sequence >= keyed_from and not mac.event_ok(
            event.sequence, event.event_hash, event.mac
        ):
            problem = (
                "the event's MAC does not match (the event was forged, or edited and rehashed)"
            )
        if problem:
            return _broken(checked, expected_sequence, problem, expected_previous, keyed_from)
        checked += 1
        expected_previous = event.event_hash
        expected_sequence += 1
    if checked != head.sequence or expected_previous != head.event_hash:
        return _broken(
            checked,
            expected_sequence,
            f"the log ends at event {checked} but the recorded head is event {head.sequence}",
            expected_previous,
            keyed_from,
        )
    if head.sequence < keyed_from:
        # The keyed part begins with an event written when the MAC key was made, so a
        # log that ends before it lost that event and everything after.
        return _broken(
            checked,
            head.sequence + 1,
            f"the log ends at event {head.sequence}, before its keyed part begins at event "
            f"{keyed_from} (events were deleted)",
            expected_previous,
            keyed_from,
        )
    if not mac.head_ok(head.sequence, head.event_hash, head.mac):
        return _broken(
            checked,
            head.sequence,
            "the head's MAC does not match (the newest events were removed or the head was moved)",
            expected_previous,
            keyed_from,
        )
    return AuditVerification(True, checked, 0, "", expected_previous, keyed_from)


def _broken(
    checked: int, sequence: int, problem: str, head_hash: str, keyed_from: int
) -> AuditVerification:
    return AuditVerification(False, checked, sequence, problem, head_hash, keyed_from)
