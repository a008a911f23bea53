"""The two-person rule (policy `destroy_approvals = 2`): a destroy waits for a different
admin's approval before its waiting period starts; cancellable at either stage; audited."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kms.v1 import kms_pb2, kms_pb2_grpc
from server.domain.model import SCHEDULER
from server.policy import hash_token
from tests.conftest import ROLES, KmsStub, RunningKms, start_kms
from tests.integration.kms_helpers import (
    KEY,
    all_audit_events,
    expect_error,
    issue,
    message_of,
    register,
    resolve,
    rotate,
    verify,
)

PENDING = kms_pb2.KEY_VERSION_STATE_PENDING_APPROVAL
SCHEDULED = kms_pb2.KEY_VERSION_STATE_DESTROY_SCHEDULED


def _principal(name: str, role: str, token: str) -> str:
    return (
        f'[principals.{name}]\nauth = ["token"]\ntoken_sha256 = ["{hash_token(token)}"]\n'
        f'[[principals.{name}.grants]]\nroles = ["{role}"]\nkeys = ["*"]\n'
    )


def _write_policy(data_dir: Path, second_admin_token: str) -> None:
    """The dev principals plus a second admin, under the two-person rule."""
    (data_dir / "tokens").mkdir(parents=True)
    lines = ["destroy_approvals = 2\n"]
    for role in ROLES:
        token = secrets.token_urlsafe(32)
        (data_dir / "tokens" / role).write_text(token + "\n")
        lines.append(_principal(f"dev-{role}", role, token))
    lines.append(_principal("second-admin", "admin", second_admin_token))
    (data_dir / "policy.toml").write_text("\n".join(lines))


def _start(tmp_path: Path, database_url: str, delay: str) -> tuple[RunningKms, KmsStub]:
    data_dir = tmp_path / "kms"
    token = secrets.token_urlsafe(32)
    _write_policy(data_dir, token)
    kms = start_kms(data_dir, database_url, destroy_delay=delay)
    channel = grpc.insecure_channel(kms.address)
    kms._channels.append(channel)
    second = KmsStub(
        kms_pb2_grpc.KeyManagementServiceStub(channel), (("authorization", f"Bearer {token}"),)
    )
    return kms, second


@pytest.fixture
def two_admins(tmp_path: Path, database_url: str) -> Iterator[tuple[RunningKms, KmsStub]]:
    kms, second = _start(tmp_path, database_url, "1h")
    try:
        yield kms, second
    finally:
        kms.close()


def _prepare(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    register(admin, activate=True)
    issue(kms.stub("backup"), "b-1")
    register(admin)
    rotate(admin, 2)


def _approve(stub: KmsStub) -> kms_pb2.KeyVersion:
    reply = stub.ApproveKeyVersionDestruction(
        kms_pb2.ApproveKeyVersionDestructionRequest(key_name=KEY, version=1)
    )
    version: kms_pb2.KeyVersion = reply.key_version
    return version


def _destroy(stub: KmsStub) -> kms_pb2.KeyVersion:
    reply = stub.DestroyKeyVersion(kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=1))
    version: kms_pb2.KeyVersion = reply.key_version
    return version


def test_a_destroy_waits_for_a_different_admin_and_self_approval_is_refused(
    two_admins: tuple[RunningKms, KmsStub],
) -> None:
    kms, second = two_admins
    admin = kms.stub("admin")
    _prepare(kms)
    pending = _destroy(admin)
    assert pending.state == PENDING and pending.destroy_requested_by == "dev-admin"
    assert not pending.HasField("destroy_time")
    expect_error(
        lambda: resolve(kms.stub("restore"), "b-1"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "KEY_VERSION_PENDING_APPROVAL",
    )
    error = expect_error(
        lambda: _approve(admin), grpc.StatusCode.PERMISSION_DENIED, "SELF_APPROVAL"
    )
    assert "different admin" in message_of(error)

    before = time.time()
    approved = _approve(second)
    assert approved.state == SCHEDULED
    assert (approved.destroy_requested_by, approved.destroy_approved_by) == (
        "dev-admin",
        "second-admin",
    )
    # The waiting period starts with the approval.
    assert approved.destroy_time.ToSeconds() >= int(before) + 3600 - 1
    expect_error(
        lambda: _approve(second), grpc.StatusCode.FAILED_PRECONDITION, "DESTRUCTION_NOT_PENDING"
    )
    steps = [
        (e.actor, e.action, e.outcome)
        for e in all_audit_events(kms.stub("auditor"), KEY)
        if e.action.startswith("key_version.") and "destroy" in e.action
    ]
    assert steps == [
        ("dev-admin", "key_version.schedule_destroy", kms_pb2.AUDIT_OUTCOME_ALLOWED),
        ("dev-admin", "key_version.approve_destroy", kms_pb2.AUDIT_OUTCOME_DENIED),
        ("second-admin", "key_version.approve_destroy", kms_pb2.AUDIT_OUTCOME_ALLOWED),
        ("second-admin", "key_version.approve_destroy", kms_pb2.AUDIT_OUTCOME_DENIED),
    ]
    assert verify(kms).intact


def test_cancelling_works_at_either_stage(two_admins: tuple[RunningKms, KmsStub]) -> None:
    kms, second = two_admins
    admin = kms.stub("admin")
    _prepare(kms)

    def cancel(stub: KmsStub) -> kms_pb2.KeyVersion:
        reply = stub.CancelKeyVersionDestruction(
            kms_pb2.CancelKeyVersionDestructionRequest(key_name=KEY, version=1)
        )
        version: kms_pb2.KeyVersion = reply.key_version
        return version

    _destroy(admin)
    assert cancel(second).state == kms_pb2.KEY_VERSION_STATE_DISABLED
    _destroy(second)
    _approve(admin)
    cancelled = cancel(admin)
    assert cancelled.state == kms_pb2.KEY_VERSION_STATE_DISABLED
    assert not cancelled.destroy_requested_by and not cancelled.destroy_approved_by
    assert verify(kms).intact


def test_an_approved_destruction_is_carried_out_naming_both_admins(
    tmp_path: Path, database_url: str
) -> None:
    kms, second = _start(tmp_path, database_url, "1s")
    try:
        _prepare(kms)
        _destroy(kms.stub("admin"))
        time.sleep(1.5)  # pending: no waiting period runs before the approval
        versions = kms.stub("admin").ListKeyVersions(kms_pb2.ListKeyVersionsRequest(key_name=KEY))
        assert versions.key_versions[0].state == PENDING
        _approve(second)
        deadline = time.monotonic() + 20
        while True:
            listed = kms.stub("admin").ListKeyVersions(kms_pb2.ListKeyVersionsRequest(key_name=KEY))
            if listed.key_versions[0].state == kms_pb2.KEY_VERSION_STATE_DESTROYED:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [done] = [
            e
            for e in all_audit_events(kms.stub("auditor"), KEY)
            if e.action == "key_version.destroy"
        ]
        assert done.actor == SCHEDULER
        assert "asked by dev-admin, approved by second-admin" in done.detail
        assert verify(kms).intact
    finally:
        kms.close()
