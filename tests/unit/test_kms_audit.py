"""Checkpoints and exports (kms_audit), checked as an auditor would, with keys made here."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from kms_audit import checkpoint as checkpoints
from kms_audit.chain import GENESIS_HASH, event_hash
from kms_audit.export import ExportInvalid, checkpoint_line, event_line, verify_export

SIGNER = Ed25519PrivateKey.generate()
PUBLIC = SIGNER.public_key()


def events(count: int, start: int = 1, previous: str = GENESIS_HASH) -> list[dict[str, Any]]:
    out = []
    for sequence in range(start, start + count):
        event: dict[str, Any] = {
            "sequence": sequence, "time_us": 1_700_000_000_000_000 + sequence,
            "actor": "dev-admin", "action": "key.rotate", "outcome": "allowed",
            "status_code": "OK", "key_name": "k", "version": 0, "from_version": 0,
            "to_version": sequence, "backup_id": "", "reason": "", "detail": "",
            "previous_hash": previous, "mac": "ab" * 32,
        }  # fmt: skip
        event["event_hash"] = previous = event_hash(previous, event)
        out.append(event)
    return out


def export(records: list[dict[str, Any]], signer: Ed25519PrivateKey = SIGNER) -> list[str]:
    last = records[-1]
    closing = checkpoints.sign(signer, last["sequence"], last["event_hash"], 1)
    return [*(event_line(e) for e in records), checkpoint_line(closing)]


def kept_at(records: list[dict[str, Any]], sequence: int) -> checkpoints.Checkpoint:
    event = next(e for e in records if e["sequence"] == sequence)
    return checkpoints.sign(SIGNER, sequence, event["event_hash"], 1)


def test_an_export_verifies_and_reports_its_range() -> None:
    records = events(5)
    summary = verify_export(export(records), PUBLIC)
    assert (summary.first_sequence, summary.last_sequence, summary.events) == (1, 5, 5)


def test_a_kept_checkpoint_inside_or_just_before_the_export_is_extended() -> None:
    records = events(10)
    assert verify_export(export(records), PUBLIC, kept_at(records, 4)).extends is not None
    part = records[4:]  # --since 4: starts at event 5, whose previous_hash is event 4's hash
    assert verify_export(export(part), PUBLIC, kept_at(records, 4)).first_sequence == 5


def test_a_kept_checkpoint_of_a_rewritten_log_is_refused() -> None:
    original = events(6)
    rewritten = events(6)
    rewritten[1]["actor"] = "mallory"
    previous = rewritten[0]["event_hash"]
    for event in rewritten[1:]:
        event["previous_hash"] = previous
        event["event_hash"] = previous = event_hash(previous, event)
    with pytest.raises(ExportInvalid, match="does not extend the kept checkpoint"):
        verify_export(export(rewritten), PUBLIC, kept_at(original, 3))


def test_a_kept_checkpoint_before_the_export_asks_for_an_earlier_since() -> None:
    records = events(10)
    with pytest.raises(ExportInvalid, match="--since 2"):
        verify_export(export(records[5:]), PUBLIC, kept_at(records, 2))


def test_a_kept_checkpoint_beyond_the_export_means_truncation() -> None:
    records = events(10)
    with pytest.raises(ExportInvalid, match="truncated or rolled back"):
        verify_export(export(records[:6]), PUBLIC, kept_at(records, 8))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda lines: lines[:-1], "does not end with a signed checkpoint"),
        (lambda lines: [lines[0], *lines[2:]], "expected event 2 but found event 3"),
        (lambda lines: [*lines[:2], "{not json", *lines[2:]], "line 3 is not JSON"),
        (lambda lines: [*lines, lines[0]], "follows the closing checkpoint"),
        (lambda lines: [lines[-1]], "holds no events"),
        (lambda lines: [lines[1], lines[0], *lines[2:]], "expected event 3 but found event 1"),
        (lambda lines: [*lines[:-2], lines[-1]], "closing checkpoint is for event 4"),
    ],
)
def test_damaged_exports_are_refused_with_their_own_message(damage: Any, message: str) -> None:
    with pytest.raises(ExportInvalid, match=message):
        verify_export(damage(export(events(4))), PUBLIC)


def test_an_edited_field_or_a_wrong_type_is_refused() -> None:
    lines = export(events(3))
    edited = json.loads(lines[1])
    edited["reason"] = "edited"
    with pytest.raises(ExportInvalid, match="event 2 does not match its hash"):
        verify_export([lines[0], json.dumps(edited), *lines[2:]], PUBLIC)
    edited = json.loads(lines[1])
    edited["version"] = "0"
    with pytest.raises(ExportInvalid, match="'version' must be an integer"):
        verify_export([lines[0], json.dumps(edited), *lines[2:]], PUBLIC)


def test_a_checkpoint_signed_by_another_key_or_altered_is_refused() -> None:
    records = events(3)
    with pytest.raises(ExportInvalid, match="another server"):
        verify_export(export(records, Ed25519PrivateKey.generate()), PUBLIC)
    closing = checkpoints.sign(SIGNER, 3, records[-1]["event_hash"], 1)
    altered = dataclasses.replace(closing, time_us=2)
    lines = [*(event_line(e) for e in records), checkpoint_line(altered)]
    with pytest.raises(ExportInvalid, match="signature does not verify"):
        verify_export(lines, PUBLIC)


@given(st.text(min_size=1, max_size=200).filter(str.strip))
def test_any_line_is_refused_with_export_invalid_and_nothing_else(line: str) -> None:
    lines = export(events(2))
    with pytest.raises(ExportInvalid):
        verify_export([lines[0], line, lines[1], lines[2]], PUBLIC)


@given(st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=5), max_size=8))
def test_any_checkpoint_object_is_refused_with_checkpoint_error(value: dict[str, Any]) -> None:
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.Checkpoint.from_json({"format": checkpoints.CHECKPOINT_FORMAT, **value})
