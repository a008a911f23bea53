"""Scheduled destruction: refused while scheduled, cancellable until due, carried out by the
server once due (also after a restart), under the row MAC and in the audit replay; and the
blast radius (backup_count, ListBackups)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from kms.v1 import kms_pb2
from server.domain.model import SCHEDULER
from tests.conftest import RunningKms, start_kms
from tests.integration.kms_helpers import (
    KEY,
    all_audit_events,
    database,
    expect_error,
    issue,
    message_of,
    register,
    resolve,
    rotate,
    verify,
)

DELAY_SECONDS = 2
SCHEDULED = kms_pb2.KEY_VERSION_STATE_DESTROY_SCHEDULED


@pytest.fixture
def slow_kms(tmp_path: Path, database_url: str) -> Iterator[RunningKms]:
    """A server whose destructions wait a long time (one hour)."""
    running = start_kms(tmp_path / "kms", database_url, destroy_delay="1h")
    try:
        yield running
    finally:
        running.close()


def _rotated_with_backup(kms: RunningKms) -> None:
    """Version 1 holds backup b-1; version 2 is active."""
    admin = kms.stub("admin")
    register(admin, activate=True)
    issue(kms.stub("backup"), "b-1")
    register(admin)
    rotate(admin, 2)


def _destroy(kms: RunningKms, version: int = 1) -> kms_pb2.KeyVersion:
    reply = kms.stub("admin").DestroyKeyVersion(
        kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=version, reason="retire")
    )
    key_version: kms_pb2.KeyVersion = reply.key_version
    return key_version


def _cancel(kms: RunningKms, version: int = 1) -> kms_pb2.KeyVersion:
    reply = kms.stub("admin").CancelKeyVersionDestruction(
        kms_pb2.CancelKeyVersionDestructionRequest(key_name=KEY, version=version)
    )
    key_version: kms_pb2.KeyVersion = reply.key_version
    return key_version


def _get(kms: RunningKms, version: int = 1) -> kms_pb2.KeyVersion:
    reply = kms.stub("admin").GetKeyVersion(
        kms_pb2.GetKeyVersionRequest(key_name=KEY, version=version)
    )
    key_version: kms_pb2.KeyVersion = reply.key_version
    return key_version


def _admin_call(kms: RunningKms, call: str, role: str = "admin") -> Callable[[], Any]:
    """A version call on version 1, made with the role's token."""
    request = getattr(kms_pb2, f"{call}Request")(key_name=KEY, version=1)
    return lambda: getattr(kms.stub(role), call)(request)


def _wait_destroyed(kms: RunningKms, timeout: float = 20) -> float:
    start = time.monotonic()
    while _get(kms).state != kms_pb2.KEY_VERSION_STATE_DESTROYED:
        assert time.monotonic() - start < timeout, "the due destruction was not carried out"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_destroy_schedules_and_the_version_refuses_its_backups_naming_the_due_time(
    slow_kms: RunningKms,
) -> None:
    _rotated_with_backup(slow_kms)
    before = time.time()
    scheduled = _destroy(slow_kms)
    assert scheduled.state == SCHEDULED
    assert scheduled.destroy_requested_by == "dev-admin"
    assert scheduled.backup_count == 1
    due = scheduled.destroy_time.ToSeconds()
    assert before + 3600 - 5 <= due <= time.time() + 3600 + 5
    due_text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(due))

    error = expect_error(
        lambda: resolve(slow_kms.stub("restore"), "b-1"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "KEY_VERSION_DESTROY_SCHEDULED",
    )
    assert due_text in message_of(error)
    assert f"cancel-destroy {KEY} 1" in message_of(error)
    # It cannot be made active, enabled, disabled or scheduled again.
    expect_error(
        lambda: rotate(slow_kms.stub("admin"), 1),
        grpc.StatusCode.FAILED_PRECONDITION,
        "KEY_VERSION_DESTROY_SCHEDULED",
    )
    for call in ("EnableKeyVersion", "DisableKeyVersion", "DestroyKeyVersion"):
        expect_error(
            _admin_call(slow_kms, call),
            grpc.StatusCode.FAILED_PRECONDITION,
            "KEY_VERSION_DESTROY_SCHEDULED",
        )
    # The material is still there: scheduling erases nothing.
    with database(slow_kms) as connection:
        material = connection.execute(
            text("SELECT wrapped_material FROM key_versions WHERE version = 1")
        ).scalar_one()
    assert material is not None
    events = all_audit_events(slow_kms.stub("auditor"), KEY)
    schedule = [
        e
        for e in events
        if e.action == "key_version.schedule_destroy" and e.outcome == kms_pb2.AUDIT_OUTCOME_ALLOWED
    ]
    assert len(schedule) == 1 and schedule[0].actor == "dev-admin"
    assert due_text in schedule[0].detail
    assert verify(slow_kms).intact


def test_cancel_returns_the_version_to_disabled_and_enabling_restores_its_backups(
    slow_kms: RunningKms,
) -> None:
    _rotated_with_backup(slow_kms)
    _destroy(slow_kms)
    cancelled = _cancel(slow_kms)
    assert cancelled.state == kms_pb2.KEY_VERSION_STATE_DISABLED
    assert not cancelled.HasField("destroy_time") and not cancelled.destroy_requested_by
    expect_error(
        lambda: _cancel(slow_kms),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DESTRUCTION_NOT_SCHEDULED",
    )
    slow_kms.stub("admin").EnableKeyVersion(
        kms_pb2.EnableKeyVersionRequest(key_name=KEY, version=1)
    )
    assert resolve(slow_kms.stub("restore"), "b-1").version == 1
    cancel_events = [
        e
        for e in all_audit_events(slow_kms.stub("auditor"), KEY)
        if e.action == "key_version.cancel_destroy"
    ]
    assert [e.outcome for e in cancel_events] == [
        kms_pb2.AUDIT_OUTCOME_ALLOWED,
        kms_pb2.AUDIT_OUTCOME_DENIED,
    ]
    assert verify(slow_kms).intact


def test_only_an_admin_schedules_or_cancels(slow_kms: RunningKms) -> None:
    _rotated_with_backup(slow_kms)
    for role in ("backup", "restore", "auditor"):
        expect_error(
            _admin_call(slow_kms, "DestroyKeyVersion", role), grpc.StatusCode.PERMISSION_DENIED
        )
    _destroy(slow_kms)
    expect_error(
        lambda: slow_kms.stub("backup").CancelKeyVersionDestruction(
            kms_pb2.CancelKeyVersionDestructionRequest(key_name=KEY, version=1)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert _get(slow_kms).state == SCHEDULED


def test_the_server_carries_out_a_due_destruction_as_the_scheduler(
    tmp_path: Path, database_url: str
) -> None:
    kms = start_kms(tmp_path / "kms", database_url, destroy_delay=f"{DELAY_SECONDS}s")
    try:
        _rotated_with_backup(kms)
        scheduled = _destroy(kms)
        assert scheduled.state == SCHEDULED
        _wait_destroyed(kms)
        destroyed = _get(kms)
        # No earlier than due.
        assert destroyed.destroy_time.ToMicroseconds() >= scheduled.destroy_time.ToMicroseconds()
        with database(kms) as connection:
            material = connection.execute(
                text("SELECT wrapped_material FROM key_versions WHERE version = 1")
            ).scalar_one()
        assert material is None
        expect_error(
            lambda: resolve(kms.stub("restore"), "b-1"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "KEY_VERSION_DESTROYED",
        )
        carried_out = [
            e
            for e in all_audit_events(kms.stub("auditor"), KEY)
            if e.action == "key_version.destroy"
        ]
        assert len(carried_out) == 1
        assert carried_out[0].actor == SCHEDULER
        assert "asked by dev-admin" in carried_out[0].detail
        assert verify(kms).intact
    finally:
        kms.close()


def test_a_destruction_that_fell_due_while_the_server_was_down_is_carried_out_at_start(
    tmp_path: Path, database_url: str
) -> None:
    kms = start_kms(tmp_path / "kms", database_url, destroy_delay=f"{DELAY_SECONDS}s")
    url = kms.database_url
    try:
        _rotated_with_backup(kms)
        _destroy(kms)
    finally:
        kms.close()
    time.sleep(DELAY_SECONDS + 0.5)
    restarted = start_kms(tmp_path / "kms", url, destroy_delay=f"{DELAY_SECONDS}s")
    try:
        # Carried out before the server answered its first call.
        assert _get(restarted).state == kms_pb2.KEY_VERSION_STATE_DESTROYED
        assert verify(restarted).intact
    finally:
        restarted.close()


def test_a_restart_during_the_waiting_period_keeps_the_schedule(
    tmp_path: Path, database_url: str
) -> None:
    kms = start_kms(tmp_path / "kms", database_url, destroy_delay="1h")
    url = kms.database_url
    try:
        _rotated_with_backup(kms)
        due = _destroy(kms).destroy_time
    finally:
        kms.close()
    restarted = start_kms(tmp_path / "kms", url, destroy_delay="1h")
    try:
        after = _get(restarted)
        assert after.state == SCHEDULED and after.destroy_time == due
        assert _cancel(restarted).state == kms_pb2.KEY_VERSION_STATE_DISABLED
    finally:
        restarted.close()


@pytest.mark.parametrize(
    "column, value",
    [("destroy_due_us", "destroy_due_us - 3600000000"), ("destroy_requested_by", "'mallory'")],
)
def test_a_schedule_changed_in_the_database_is_refused_and_reported(
    slow_kms: RunningKms, column: str, value: str
) -> None:
    """Moving the due time forward (or the requester) breaks the row's MAC."""
    _rotated_with_backup(slow_kms)
    _destroy(slow_kms)
    with database(slow_kms) as connection:
        connection.execute(text(f"UPDATE key_versions SET {column} = {value} WHERE version = 1"))
    expect_error(lambda: _get(slow_kms), grpc.StatusCode.DATA_LOSS, "STATE_INTEGRITY")
    expect_error(
        lambda: resolve(slow_kms.stub("restore"), "b-1"),
        grpc.StatusCode.DATA_LOSS,
        "STATE_INTEGRITY",
    )
    result = verify(slow_kms)
    assert not result.intact and "version 1" in result.problem


def test_an_older_schedule_put_back_is_caught_by_the_replay(slow_kms: RunningKms) -> None:
    """A validly MAC'd row from before the cancel, restored, is not the log's last word."""
    _rotated_with_backup(slow_kms)
    _destroy(slow_kms)
    columns = "state, destroy_due_us, destroy_requested_by, state_sequence, mac"
    with database(slow_kms) as connection:
        old = connection.execute(
            text(f"SELECT {columns} FROM key_versions WHERE version = 1")
        ).one()
    _cancel(slow_kms)
    with database(slow_kms) as connection:
        connection.execute(
            text(
                "UPDATE key_versions SET state = :s, destroy_due_us = :d,"
                " destroy_requested_by = :r, state_sequence = :q, mac = :m WHERE version = 1"
            ),
            {"s": old[0], "d": old[1], "r": old[2], "q": old[3], "m": old[4]},
        )
    result = verify(slow_kms)
    assert not result.intact and "made it disabled" in result.problem


def test_backup_count_and_list_backups(slow_kms: RunningKms) -> None:
    admin, backup = slow_kms.stub("admin"), slow_kms.stub("backup")
    register(admin, activate=True)
    for number in range(5):
        issue(backup, f"v1-{number}")
    register(admin)
    rotate(admin, 2)
    for number in range(3):
        issue(backup, f"v2-{number}")
    listed = admin.ListKeyVersions(kms_pb2.ListKeyVersionsRequest(key_name=KEY)).key_versions
    assert [(v.version, v.backup_count) for v in listed] == [(1, 5), (2, 3)]
    assert _get(slow_kms, 1).backup_count == 5

    pages: list[list[str]] = []
    token = ""
    while True:
        page = admin.ListBackups(
            kms_pb2.ListBackupsRequest(key_name=KEY, version=1, page_size=2, page_token=token)
        )
        pages.append([b.backup_id for b in page.backups])
        assert all(b.version == 1 and b.create_time.seconds > 0 for b in page.backups)
        token = page.next_page_token
        if not token:
            break
    assert pages == [["v1-0", "v1-1"], ["v1-2", "v1-3"], ["v1-4"]]
    everything = admin.ListBackups(kms_pb2.ListBackupsRequest(key_name=KEY)).backups
    assert len(everything) == 8
    expect_error(
        lambda: admin.ListBackups(kms_pb2.ListBackupsRequest(key_name=KEY, page_token="zz")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
    )
    expect_error(
        lambda: admin.ListBackups(kms_pb2.ListBackupsRequest(key_name=KEY, version=9)),
        grpc.StatusCode.NOT_FOUND,
        "KEY_VERSION_NOT_FOUND",
    )
    expect_error(
        lambda: backup.ListBackups(kms_pb2.ListBackupsRequest(key_name=KEY)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
