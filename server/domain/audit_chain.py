"""The audit log's hash chain: each event's hash covers the previous hash and its own fields."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

from server.domain.model import AuditEvent, AuditVerification

GENESIS_HASH = "0" * 64

# The fields a hash covers, in a fixed order: adding one is a format change.
HASHED_FIELDS = (
    "sequence",
    "time_us",
    "actor",
    "action",
    "outcome",
    "status_code",
    "key_name",
    "version",
    "from_version",
    "to_version",
    "backup_id",
    "reason",
    "detail",
)


# One encoder for every event: json.dumps with options builds a new one per call.
_CANONICAL_JSON = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def event_hash(previous_hash: str, fields: Mapping[str, object]) -> str:
    canonical = _CANONICAL_JSON.encode([previous_hash, *(fields[name] for name in HASHED_FIELDS)])
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def verify_chain(
    events: Iterable[AuditEvent], head_sequence: int, head_hash: str
) -> AuditVerification:
    """Walks the log in sequence order and reports the first link that does not hold.

    Editing a row breaks its own hash; deleting or reordering rows breaks the
    sequence or the next row's `previous_hash`; deleting the newest rows no
    longer matches the head the server keeps beside the log.
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
        if problem:
            return AuditVerification(False, checked, expected_sequence, problem, expected_previous)
        checked += 1
        expected_previous = event.event_hash
        expected_sequence += 1
    if checked != head_sequence or expected_previous != head_hash:
        return AuditVerification(
            False,
            checked,
            expected_sequence,
            f"the log ends at event {checked} but the recorded head is event {head_sequence}",
            expected_previous,
        )
    return AuditVerification(True, checked, 0, "", expected_previous)
