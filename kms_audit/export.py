"""Audit exports: JSON Lines of events, then the server's signed checkpoint of the last one.

`verify_export` checks one with no server and no database: every event against its
hash, every link, the closing checkpoint's signature, and, given a checkpoint the
auditor kept from before, that the log still extends it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kms_audit import checkpoint as checkpoints
from kms_audit.chain import GENESIS_HASH, HASHED_FIELDS, event_hash

# Every event line has these, and "mac" (hex, or null for events older than the keyed chain).
EVENT_FIELDS = (*HASHED_FIELDS, "previous_hash", "event_hash")
_INTEGER_FIELDS = {"sequence", "time_us", "version", "from_version", "to_version"}


class ExportInvalid(Exception):
    """The export does not verify; the message says where and why."""


@dataclass(frozen=True)
class ExportSummary:
    first_sequence: int
    last_sequence: int
    events: int
    checkpoint: checkpoints.Checkpoint
    extends: checkpoints.Checkpoint | None


def event_line(event: Mapping[str, Any]) -> str:
    return json.dumps({name: event[name] for name in (*EVENT_FIELDS, "mac")}, ensure_ascii=True)


def checkpoint_line(checkpoint: checkpoints.Checkpoint) -> str:
    return json.dumps({"checkpoint": checkpoint.to_json()}, ensure_ascii=True)


def verify_export(
    lines: Iterable[str],
    public_key: Ed25519PublicKey,
    kept: checkpoints.Checkpoint | None = None,
) -> ExportSummary:
    if kept is not None:
        _verified(public_key, kept, "kept checkpoint")
    hashes: dict[int, str] = {}  # only what `kept` may need: its sequence's hash
    first = last = 0
    previous = ""
    closing: checkpoints.Checkpoint | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if closing is not None:
            raise ExportInvalid(f"line {number} follows the closing checkpoint")
        record = _parse(line, number)
        if "checkpoint" in record:
            closing = _verified(public_key, _checkpoint(record["checkpoint"], number), "checkpoint")
            continue
        sequence = _check_event(record, number)
        if first == 0:
            first = sequence
            if sequence == 1 and record["previous_hash"] != GENESIS_HASH:
                raise ExportInvalid("event 1 does not start from the genesis hash")
            hashes[sequence - 1] = record["previous_hash"]
        elif sequence != last + 1:
            raise ExportInvalid(
                f"line {number}: expected event {last + 1} but found event {sequence} "
                "(events were deleted or reordered)"
            )
        elif record["previous_hash"] != previous:
            raise ExportInvalid(
                f"line {number}: event {sequence} does not link to event {last} "
                "(an event before it was changed or replaced)"
            )
        if event_hash(record["previous_hash"], record) != record["event_hash"]:
            raise ExportInvalid(
                f"line {number}: event {sequence} does not match its hash (the line was edited)"
            )
        last, previous = sequence, record["event_hash"]
        if kept is not None and sequence == kept.sequence:
            hashes[sequence] = previous
    if closing is None:
        raise ExportInvalid(
            "the export does not end with a signed checkpoint: it is truncated or not an export"
        )
    if first == 0:
        raise ExportInvalid("the export holds no events")
    if closing.sequence != last or closing.chain_hash != previous:
        raise ExportInvalid(
            f"the closing checkpoint is for event {closing.sequence} but the export ends at "
            f"event {last} with another hash: events were added, removed or changed"
        )
    if kept is not None:
        _check_extends(kept, first, last, hashes)
    return ExportSummary(first, last, last - first + 1, closing, kept)


def _check_extends(
    kept: checkpoints.Checkpoint, first: int, last: int, hashes: Mapping[int, str]
) -> None:
    if kept.sequence > last:
        raise ExportInvalid(
            f"the log was truncated or rolled back: the kept checkpoint covers event "
            f"{kept.sequence}, but the log now ends at event {last}"
        )
    if kept.sequence < first - 1:
        raise ExportInvalid(
            f"the export starts at event {first}, after the kept checkpoint's event "
            f"{kept.sequence}: export with --since {kept.sequence} or earlier to compare them"
        )
    if hashes.get(kept.sequence) != kept.chain_hash:
        raise ExportInvalid(
            f"the log does not extend the kept checkpoint: event {kept.sequence} now has "
            "another hash (the log was rewritten up to it)"
        )


def _verified(
    public_key: Ed25519PublicKey, checkpoint: checkpoints.Checkpoint, what: str
) -> checkpoints.Checkpoint:
    try:
        checkpoints.verify(public_key, checkpoint, what)
    except checkpoints.CheckpointError as error:
        raise ExportInvalid(str(error)) from None
    return checkpoint


def _checkpoint(value: object, number: int) -> checkpoints.Checkpoint:
    try:
        return checkpoints.Checkpoint.from_json(value)
    except checkpoints.CheckpointError as error:
        raise ExportInvalid(f"line {number}: {error}") from None


def _parse(line: str, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        raise ExportInvalid(f"line {number} is not JSON") from None
    if not isinstance(record, dict):
        raise ExportInvalid(f"line {number} is not a JSON object")
    return record


def _check_event(record: Mapping[str, Any], number: int) -> int:
    for name in EVENT_FIELDS:
        if name not in record:
            raise ExportInvalid(f"line {number}: the event has no {name!r} field")
        value = record[name]
        wanted_int = name in _INTEGER_FIELDS
        if wanted_int != (isinstance(value, int) and not isinstance(value, bool)):
            kind = "an integer" if wanted_int else "a string"
            raise ExportInvalid(f"line {number}: {name!r} must be {kind}")
    sequence: int = record["sequence"]
    if sequence < 1:
        raise ExportInvalid(f"line {number}: sequence must be at least 1")
    return sequence
