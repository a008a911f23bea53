"""Automatic rotation by period: UpdateKey, the scheduler's new active version as
system:scheduler, the schedule under the key row's MAC and in the audit replay."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from kms.v1 import kms_pb2
from server.domain.model import SCHEDULER
from tests.conftest import RunningKms, start_kms
from tests.integration.kms_helpers import (
    KEY,
    active_version,
    all_audit_events,
    database,
    expect_error,
    issue,
    register,
    verify,
)

PERIOD = 2


def _update(kms: RunningKms, period: int) -> kms_pb2.Key:
    reply = kms.stub("admin").UpdateKey(
        kms_pb2.UpdateKeyRequest(key_name=KEY, rotation_period_seconds=period)
    )
    key: kms_pb2.Key = reply.key
    return key


def test_a_due_key_gets_a_new_active_version_from_the_scheduler(kms: RunningKms) -> None:
    register(kms.stub("admin"), activate=True)
    before = time.time()
    key = _update(kms, PERIOD)
    assert key.rotation_period_seconds == PERIOD
    assert before + PERIOD - 1 <= key.next_rotation_time.ToSeconds() <= time.time() + PERIOD + 1
    listed = kms.stub("admin").ListKeys(kms_pb2.ListKeysRequest()).keys
    assert listed[0].next_rotation_time == key.next_rotation_time

    deadline = time.monotonic() + 20
    while active_version(kms.stub("admin")) < 3:
        assert time.monotonic() < deadline, "no automatic rotation"
        time.sleep(0.1)
    assert issue(kms.stub("backup"), "after").version >= 3
    _update(kms, 0)
    settled = active_version(kms.stub("admin"))
    time.sleep(PERIOD + 0.5)
    assert active_version(kms.stub("admin")) == settled
    rotations = [
        e
        for e in all_audit_events(kms.stub("auditor"), KEY)
        if e.action == "key_version.register" and e.actor == SCHEDULER
    ]
    assert [e.version for e in rotations] == list(range(2, settled + 1))
    assert all(e.to_version == e.version for e in rotations)
    assert verify(kms).intact


def test_update_key_checks_its_caller_and_period(kms: RunningKms) -> None:
    register(kms.stub("admin"), activate=True)
    expect_error(
        lambda: kms.stub("backup").UpdateKey(
            kms_pb2.UpdateKeyRequest(key_name=KEY, rotation_period_seconds=60)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    expect_error(
        lambda: kms.stub("admin").UpdateKey(
            kms_pb2.UpdateKeyRequest(key_name="nope", rotation_period_seconds=60)
        ),
        grpc.StatusCode.NOT_FOUND,
        "KEY_NOT_FOUND",
    )


@pytest.fixture
def production_like(tmp_path: Path) -> Iterator[RunningKms]:
    """A server that is not in dev mode for the period's minimum: its settings say so."""
    running = start_kms(tmp_path / "kms")
    running.server.service.auto_rotation.min_period_seconds = 3600  # type: ignore[union-attr]
    try:
        yield running
    finally:
        running.close()


def test_outside_dev_mode_the_period_is_at_least_an_hour(production_like: RunningKms) -> None:
    register(production_like.stub("admin"), activate=True)
    expect_error(
        lambda: _update(production_like, 60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ROTATION_PERIOD_INVALID",
    )
    assert _update(production_like, 90 * 86400).rotation_period_seconds == 90 * 86400


def test_a_rotation_schedule_changed_in_the_database_is_refused(kms: RunningKms) -> None:
    register(kms.stub("admin"), activate=True)
    _update(kms, 3600)
    with database(kms) as connection:
        connection.execute(text("UPDATE keys SET next_rotation_us = next_rotation_us + 1"))
    expect_error(
        lambda: issue(kms.stub("backup"), "b-1"), grpc.StatusCode.DATA_LOSS, "STATE_INTEGRITY"
    )
    assert not verify(kms).intact


def test_a_tampered_due_key_is_refused_once_not_every_pass(kms: RunningKms) -> None:
    register(kms.stub("admin"), activate=True)
    _update(kms, 3600)
    with database(kms) as connection:
        connection.execute(text("UPDATE keys SET next_rotation_us = 1"))  # due long ago
    time.sleep(3.5)  # several scheduler passes (a past-due key is looked at every second)
    refusals = [
        e
        for e in all_audit_events(kms.stub("auditor"))
        if e.actor == SCHEDULER and e.outcome == kms_pb2.AUDIT_OUTCOME_DENIED
    ]
    assert [(e.key_name, e.status_code) for e in refusals] == [(KEY, "DATA_LOSS")]
