"""--audit-file: every committed event as a JSON line, fsynced before the reply; a file that
cannot be written fails calls closed, changing nothing; SIGHUP reopens it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kms_audit.chain import event_hash
from tests.conftest import RunningKms, start_kms
from tests.integration.hardening_support import audit_count, snapshot
from tests.integration.kms_helpers import (
    all_audit_events,
    expect_error,
    issue,
    reason_of,
    register,
    rotate,
)


@pytest.fixture
def audited(tmp_path: Path, database_url: str) -> Iterator[tuple[RunningKms, Path]]:
    path = tmp_path / "audit.jsonl"
    running = start_kms(tmp_path / "kms", database_url, audit_file=str(path))
    try:
        yield running, path
    finally:
        running.close()


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_committed_event_reaches_the_file_with_its_hash_and_mac(
    audited: tuple[RunningKms, Path],
) -> None:
    kms, path = audited
    admin = kms.stub("admin")
    register(admin, activate=True)
    register(admin)
    rotate(admin, 2, reason="quarterly")
    issue(kms.stub("backup"), "b-1")
    expect_error(lambda: issue(kms.stub("restore"), "b-2"), grpc.StatusCode.PERMISSION_DENIED)
    lines = _lines(path)
    stored = all_audit_events(kms.stub("auditor"))
    # The file holds what the database holds (the auditor's list call itself comes after).
    assert [line["sequence"] for line in lines] == [e.sequence for e in stored[: len(lines)]]
    assert [line["event_hash"] for line in lines] == [e.event_hash for e in stored[: len(lines)]]
    for line in lines:
        assert line["event_hash"] == event_hash(str(line["previous_hash"]), line)
        assert isinstance(line["mac"], str) and len(line["mac"]) == 64
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_an_unwritable_audit_file_fails_calls_closed_and_changes_nothing(
    audited: tuple[RunningKms, Path], tmp_path: Path
) -> None:
    kms, path = audited
    admin = kms.stub("admin")
    register(admin, activate=True)
    before, events_before = snapshot(kms), audit_count(kms)
    # The path now leads to a device that refuses every write; SIGHUP makes the server use it.
    path.unlink()
    path.symlink_to("/dev/full")
    assert kms.server.reload()
    for call in (
        lambda: register(admin),
        lambda: issue(kms.stub("backup"), "b-1"),
        lambda: issue(kms.stub("restore"), "b-1"),  # a denial must be audited too
    ):
        error = expect_error(call, grpc.StatusCode.UNAVAILABLE)
        assert reason_of(error) == "AUDIT_UNAVAILABLE"
    assert snapshot(kms) == before
    assert audit_count(kms) == events_before
    # Back to a writable file: served again.
    path.unlink()
    assert kms.server.reload()
    register(admin)
    assert _lines(path)[0]["action"] == "key_version.register"


def test_sighup_reopens_the_file_after_log_rotation(audited: tuple[RunningKms, Path]) -> None:
    kms, path = audited
    admin = kms.stub("admin")
    register(admin, activate=True)
    rotated = path.with_suffix(".1")
    os.rename(path, rotated)
    register(admin)  # still into the renamed file until the reopen
    assert kms.server.reload()
    rotate(admin, 2)
    assert [line["action"] for line in _lines(path)] == ["key.rotate"]
    assert _lines(rotated)[-1]["action"] == "key_version.register"


def test_a_server_whose_audit_file_cannot_be_opened_does_not_start(tmp_path: Path) -> None:
    from server.app import StartupError

    with pytest.raises(StartupError, match="--audit-file"):
        start_kms(tmp_path / "kms", audit_file=str(tmp_path / "missing-dir" / "audit.jsonl"))
