"""Story 6.1 through the gRPC API: registering versions and rotating the active one.

Rotation never re-encrypts: backups stay bound to their own versions, new
backups get the new active version, and every rotation (allowed or refused)
is audited with actor, from/to versions, time and reason.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from kms.v1 import kms_pb2
from server.keystore import crypto
from tests.conftest import RunningKms
from tests.integration.kms_helpers import (
    KEY,
    active_version,
    all_audit_events,
    expect_error,
    issue,
    last_event,
    register,
    resolve,
    rotate,
    versions,
)

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

# Acceptance criteria


def test_new_backups_get_the_new_active_version_after_rotation(kms: RunningKms) -> None:
    admin, backup = kms.stub("admin"), kms.stub("backup")
    register(admin, activate=True)
    assert issue(backup, "before-rotation").version == 1
    register(admin)
    rotate(admin, 2)
    after = issue(backup, "after-rotation")
    assert after.version == 2
    assert after.key_name == KEY and after.backup_id == "after-rotation"


def test_restore_uses_the_backups_own_key_version_after_rotation(kms: RunningKms) -> None:
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    issued = {}
    for version in (1, 2, 3):
        if version > 1:
            register(admin)
            rotate(admin, version)
        issued[version] = issue(backup, f"backup-v{version}")
    for version, key in issued.items():
        resolved = resolve(restore, f"backup-v{version}")
        assert resolved.version == version
        assert resolved.key_name == KEY
        assert resolved.data_key == key.data_key
        assert not resolved.recovered
    assert len({key.data_key for key in issued.values()}) == 3


def test_rotation_is_audited_with_actor_versions_time_and_reason(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    register(admin, activate=True)
    register(admin)
    before_us = time.time_ns() // 1000
    response = rotate(admin, 2, reason="quarterly rotation")
    after_us = time.time_ns() // 1000
    assert (response.from_version, response.to_version) == (1, 2)
    event = last_event(kms, "key.rotate")
    assert event.sequence == response.audit_sequence
    assert event.actor == "dev-admin"
    assert event.outcome == kms_pb2.AUDIT_OUTCOME_ALLOWED
    assert event.status_code == "OK"
    assert (event.key_name, event.from_version, event.to_version) == (KEY, 1, 2)
    assert event.reason == "quarterly rotation"
    assert event.time == response.rotate_time
    assert before_us <= event.time.ToMicroseconds() <= after_us


def test_first_rotation_of_a_key_without_active_version_is_from_zero(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    register(admin)
    response = admin.RotateActive(
        kms_pb2.RotateActiveRequest(key_name=KEY, to_version=1, expected_active_version=0)
    )
    assert (response.from_version, response.to_version) == (0, 1)
    assert active_version(admin) == 1


def test_rotation_back_to_an_older_enabled_version_is_allowed(kms: RunningKms) -> None:
    admin, backup = kms.stub("admin"), kms.stub("backup")
    register(admin, activate=True)
    register(admin)
    rotate(admin, 2)
    response = rotate(admin, 1, reason="roll back")
    assert (response.from_version, response.to_version) == (2, 1)
    assert issue(backup, "after-roll-back").version == 1


def test_rotation_with_the_right_expected_active_version_succeeds(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    register(admin, activate=True)
    register(admin)
    admin.RotateActive(
        kms_pb2.RotateActiveRequest(key_name=KEY, to_version=2, expected_active_version=1)
    )
    assert active_version(admin) == 2


# RegisterKeyVersion


def test_register_numbers_versions_1_2_3_and_does_not_activate_them(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    numbers = [register(admin).version for _ in range(3)]
    assert numbers == [1, 2, 3]
    listed = versions(admin)
    assert [v.version for v in listed] == [1, 2, 3]
    assert not any(v.active for v in listed)
    assert all(v.state == kms_pb2.KEY_VERSION_STATE_ENABLED for v in listed)
    assert all(v.origin == kms_pb2.KEY_VERSION_ORIGIN_GENERATED for v in listed)
    assert all(v.create_time.ToMicroseconds() > 0 for v in listed)
    assert not any(v.HasField("destroy_time") for v in listed)
    expect_error(
        lambda: issue(kms.stub("backup"), "no-active"), FAILED_PRECONDITION, "NO_ACTIVE_VERSION"
    )


def test_registering_a_new_version_keeps_the_active_one(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    register(admin, activate=True)
    new = register(admin)
    assert (new.version, new.active) == (2, False)
    assert active_version(admin) == 1
    assert issue(kms.stub("backup"), "still-v1").version == 1


def test_activate_first_version_makes_version_1_active(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    first = register(admin, activate=True)
    assert (first.version, first.active) == (1, True)
    keys = admin.ListKeys(kms_pb2.ListKeysRequest()).keys
    assert [(k.name, k.active_version, k.version_count) for k in keys] == [(KEY, 1, 1)]


def test_activate_first_version_is_refused_for_later_versions(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    register(admin)
    expect_error(
        lambda: register(admin, activate=True), FAILED_PRECONDITION, "ACTIVATE_ONLY_FIRST_VERSION"
    )
    assert [v.version for v in versions(admin)] == [1]
    assert active_version(admin) == 0
    event = last_event(kms, "key_version.register")
    assert event.outcome == kms_pb2.AUDIT_OUTCOME_DENIED
    assert event.status_code == "FAILED_PRECONDITION"


def test_imported_material_is_the_material_data_keys_are_wrapped_with(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    material = bytes(range(32))
    imported = register(admin, activate=True, material=material)
    assert imported.origin == kms_pb2.KEY_VERSION_ORIGIN_IMPORTED
    issued = issue(kms.stub("backup"), "imported-backup")
    unwrapped = crypto.unwrap_data_key(material, "imported-backup", KEY, 1, issued.wrapped_data_key)
    assert unwrapped == issued.data_key


@pytest.mark.parametrize("length", [1, 16, 31, 33, 64])
def test_imported_material_of_the_wrong_length_is_refused(kms: RunningKms, length: int) -> None:
    admin = kms.stub("admin")
    expect_error(
        lambda: register(admin, material=b"k" * length),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MATERIAL_LENGTH",
    )
    assert admin.ListKeys(kms_pb2.ListKeysRequest()).keys == []


@pytest.mark.parametrize("role", ["backup", "restore", "auditor"])
def test_only_admins_import_material(kms: RunningKms, role: str) -> None:
    expect_error(
        lambda: register(kms.stub(role), material=b"m" * 32),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    assert kms.stub("admin").ListKeys(kms_pb2.ListKeysRequest()).keys == []


@pytest.mark.parametrize(
    ("key_name", "reason"),
    [
        ("", "KEY_NAME_MISSING"),
        ("-leading-dash", "KEY_NAME_INVALID"),
        ("a" * 129, "KEY_NAME_INVALID"),
        ("has space", "KEY_NAME_INVALID"),
        ("nul\x00", "KEY_NAME_INVALID"),
        ("ключ", "KEY_NAME_INVALID"),
    ],
)
def test_register_refuses_invalid_key_names(kms: RunningKms, key_name: str, reason: str) -> None:
    admin = kms.stub("admin")
    expect_error(lambda: register(admin, key_name), grpc.StatusCode.INVALID_ARGUMENT, reason)
    event = last_event(kms, "key_version.register")
    assert (event.outcome, event.status_code) == (kms_pb2.AUDIT_OUTCOME_DENIED, "INVALID_ARGUMENT")


def test_a_128_character_key_name_is_accepted(kms: RunningKms) -> None:
    name = "k" * 128
    assert register(kms.stub("admin"), name, activate=True).key_name == name


# RotateActive denials: precise codes, nothing changed, audited as denied


def _setup_three_versions(kms: RunningKms) -> None:
    """v1 active, v2 enabled, v3 disabled, v4 destroyed."""
    admin = kms.stub("admin")
    register(admin, activate=True)
    for _ in range(3):
        register(admin)
    admin.DisableKeyVersion(kms_pb2.DisableKeyVersionRequest(key_name=KEY, version=3))
    admin.DestroyKeyVersion(kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=4))


@pytest.mark.parametrize(
    ("request_fields", "code", "reason"),
    [
        ({"key_name": "no-such-key", "to_version": 1}, grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND"),
        ({"to_version": 9}, grpc.StatusCode.NOT_FOUND, "KEY_VERSION_NOT_FOUND"),
        ({"to_version": 3}, FAILED_PRECONDITION, "KEY_VERSION_DISABLED"),
        ({"to_version": 4}, FAILED_PRECONDITION, "KEY_VERSION_DESTROYED"),
        ({"to_version": 1}, FAILED_PRECONDITION, "ALREADY_ACTIVE"),
        (
            {"to_version": 2, "expected_active_version": 2},
            grpc.StatusCode.ABORTED,
            "ACTIVE_VERSION_CHANGED",
        ),
        (
            {"to_version": 2, "expected_active_version": 0},
            grpc.StatusCode.ABORTED,
            "ACTIVE_VERSION_CHANGED",
        ),
        ({"to_version": 0}, grpc.StatusCode.INVALID_ARGUMENT, "VERSION_INVALID"),
        ({"key_name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "KEY_NAME_MISSING"),
        (
            {"to_version": 2, "reason": "x" * 1025},
            grpc.StatusCode.INVALID_ARGUMENT,
            "REASON_TOO_LONG",
        ),
        ({"to_version": 2, "reason": "a\nb"}, grpc.StatusCode.INVALID_ARGUMENT, "REASON_INVALID"),
        ({"to_version": 2, "reason": "a\x00b"}, grpc.StatusCode.INVALID_ARGUMENT, "REASON_INVALID"),
        (
            {"to_version": 4_000_000_000},
            grpc.StatusCode.INVALID_ARGUMENT,
            "VERSION_INVALID",
        ),
    ],
    ids=[
        "unknown-key",
        "unknown-version",
        "disabled",
        "destroyed",
        "already-active",
        "wrong-expected",
        "expected-none",
        "version-zero",
        "no-key-name",
        "reason-too-long",
        "reason-newline",
        "reason-nul",
        "version-beyond-int32",
    ],
)
def test_invalid_rotation_is_denied_changes_nothing_and_is_audited(
    kms: RunningKms, request_fields: dict[str, Any], code: grpc.StatusCode, reason: str
) -> None:
    _setup_three_versions(kms)
    admin, backup = kms.stub("admin"), kms.stub("backup")
    before = versions(admin)
    fields: dict[str, Any] = {"key_name": KEY, **request_fields}
    expect_error(lambda: admin.RotateActive(kms_pb2.RotateActiveRequest(**fields)), code, reason)
    assert versions(admin) == before
    assert issue(backup, "after-denial").version == 1
    event = last_event(kms, "key.rotate")
    assert event.outcome == kms_pb2.AUDIT_OUTCOME_DENIED
    assert event.status_code == code.name
    assert event.actor == "dev-admin"
    assert event.detail
    assert not [
        e
        for e in all_audit_events(kms.stub("auditor"))
        if e.action == "key.rotate" and e.outcome == kms_pb2.AUDIT_OUTCOME_ALLOWED
    ]


@pytest.mark.parametrize("role", ["backup", "restore", "auditor"])
def test_only_admins_rotate(kms: RunningKms, role: str) -> None:
    _setup_three_versions(kms)
    expect_error(
        lambda: rotate(kms.stub(role), 2), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"
    )
    assert active_version(kms.stub("admin")) == 1
    event = last_event(kms, "key.rotate")
    assert (event.outcome, event.status_code) == (kms_pb2.AUDIT_OUTCOME_DENIED, "PERMISSION_DENIED")
    assert event.actor == f"dev-{role}"
    assert (event.key_name, event.to_version) == (KEY, 2)


def test_rotation_without_credentials_is_unauthenticated_and_audited(kms: RunningKms) -> None:
    _setup_three_versions(kms)
    expect_error(
        lambda: rotate(kms.stub(None), 2), grpc.StatusCode.UNAUTHENTICATED, "CREDENTIALS_MISSING"
    )
    assert active_version(kms.stub("admin")) == 1
    event = last_event(kms, "key.rotate")
    assert (event.actor, event.outcome) == ("anonymous", kms_pb2.AUDIT_OUTCOME_DENIED)
    assert event.status_code == "UNAUTHENTICATED"
