"""Data keys through the gRPC API: issue, resolve, recover, disable, destroy, tamper."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import text

from kms.v1 import kms_pb2
from tests.conftest import RunningKms
from tests.integration.kms_helpers import (
    KEY,
    audit_rows_text,
    database,
    expect_error,
    issue,
    last_event,
    message_of,
    register,
    resolve,
    rotate,
    versions,
)

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DATA_LOSS = grpc.StatusCode.DATA_LOSS


def disable(kms: RunningKms, version: int, key: str = KEY) -> None:
    kms.stub("admin").DisableKeyVersion(
        kms_pb2.DisableKeyVersionRequest(key_name=key, version=version)
    )


def enable(kms: RunningKms, version: int, key: str = KEY) -> None:
    kms.stub("admin").EnableKeyVersion(
        kms_pb2.EnableKeyVersionRequest(key_name=key, version=version)
    )


def destroy(kms: RunningKms, version: int, key: str = KEY) -> kms_pb2.KeyVersion:
    response = kms.stub("admin").DestroyKeyVersion(
        kms_pb2.DestroyKeyVersionRequest(key_name=key, version=version, reason="shred")
    )
    destroyed: kms_pb2.KeyVersion = response.key_version
    return destroyed


def two_versions_with_backups(kms: RunningKms) -> dict[int, kms_pb2.GetActiveKeyResponse]:
    """v1 with backup "b1", then v2 active with backup "b2"."""
    admin, backup = kms.stub("admin"), kms.stub("backup")
    register(admin, activate=True)
    first = issue(backup, "b1")
    register(admin)
    rotate(admin, 2)
    return {1: first, 2: issue(backup, "b2")}


# GetActiveKey


def test_get_active_key_is_idempotent_per_backup_id_even_across_rotation(kms: RunningKms) -> None:
    admin, backup = kms.stub("admin"), kms.stub("backup")
    register(admin, activate=True)
    first = issue(backup, "backup-1")
    again = issue(backup, "backup-1")
    register(admin)
    rotate(admin, 2)
    after_rotation = issue(backup, "backup-1")
    for retry in (again, after_rotation):
        assert retry.version == 1
        assert retry.data_key == first.data_key
        assert retry.wrapped_data_key == first.wrapped_data_key
    assert issue(backup, "backup-2").version == 2


def test_data_keys_are_32_random_bytes_wrapped_without_containing_them(kms: RunningKms) -> None:
    register(kms.stub("admin"), activate=True)
    backup = kms.stub("backup")
    keys = [issue(backup, f"backup-{n}") for n in range(5)]
    for key in keys:
        assert len(key.data_key) == 32
        assert key.wrapped_data_key != key.data_key
        assert key.data_key not in key.wrapped_data_key
        assert len(key.wrapped_data_key) > len(key.data_key)
    assert len({key.data_key for key in keys}) == len(keys)


def test_data_keys_never_reach_the_audit_log(kms: RunningKms) -> None:
    register(kms.stub("admin"), activate=True)
    issued = issue(kms.stub("backup"), "backup-1")
    resolve(kms.stub("restore"), "backup-1")
    rows = audit_rows_text(kms)
    for secret in (issued.data_key, issued.wrapped_data_key):
        assert secret.hex() not in rows
        assert repr(secret) not in rows
    assert "backup-1" in rows


def test_same_backup_id_under_another_key_is_already_exists(kms: RunningKms) -> None:
    admin, backup = kms.stub("admin"), kms.stub("backup")
    register(admin, "key-a", activate=True)
    register(admin, "key-b", activate=True)
    first = issue(backup, "shared-id", "key-a")
    expect_error(
        lambda: issue(backup, "shared-id", "key-b"),
        grpc.StatusCode.ALREADY_EXISTS,
        "BACKUP_ID_IN_USE",
    )
    resolved = resolve(kms.stub("restore"), "shared-id")
    assert (resolved.key_name, resolved.data_key) == ("key-a", first.data_key)


def test_get_active_key_without_active_version_is_failed_precondition(kms: RunningKms) -> None:
    register(kms.stub("admin"))
    expect_error(lambda: issue(kms.stub("backup"), "b1"), FAILED_PRECONDITION, "NO_ACTIVE_VERSION")
    expect_error(lambda: resolve(kms.stub("restore"), "b1"), NOT_FOUND, "BACKUP_NOT_FOUND")


def test_get_active_key_for_an_unknown_key_is_not_found(kms: RunningKms) -> None:
    expect_error(lambda: issue(kms.stub("backup"), "b1", "nope"), NOT_FOUND, "KEY_NOT_FOUND")


@pytest.mark.parametrize(
    ("backup_id", "key_name", "reason"),
    [
        ("", KEY, "BACKUP_ID_MISSING"),
        ("has space", KEY, "BACKUP_ID_INVALID"),
        (":leading-colon", KEY, "BACKUP_ID_INVALID"),
        ("b" * 129, KEY, "BACKUP_ID_INVALID"),
        ("nul\x00", KEY, "BACKUP_ID_INVALID"),
        ("../../etc/passwd", KEY, "BACKUP_ID_INVALID"),
        ("ok", "", "KEY_NAME_MISSING"),
        ("ok", "k" * 129, "KEY_NAME_INVALID"),
        ("ok", "bad/name", "KEY_NAME_INVALID"),
    ],
)
def test_get_active_key_refuses_invalid_backup_ids_and_key_names(
    kms: RunningKms, backup_id: str, key_name: str, reason: str
) -> None:
    register(kms.stub("admin"), activate=True)
    expect_error(lambda: issue(kms.stub("backup"), backup_id, key_name), INVALID_ARGUMENT, reason)
    event = last_event(kms, "data_key.issue")
    assert (event.outcome, event.status_code) == (kms_pb2.AUDIT_OUTCOME_DENIED, "INVALID_ARGUMENT")
    assert event.actor == "dev-backup"


def test_uuid_and_colon_backup_ids_are_accepted(kms: RunningKms) -> None:
    register(kms.stub("admin"), activate=True)
    for backup_id in ("0b7c1f0e-4b0a-4c36-9d57-6a0f5d3a2e11", "host:2026-01-01T00.00", "b" * 128):
        assert issue(kms.stub("backup"), backup_id).backup_id == backup_id


def test_issuing_is_audited_with_backup_id_and_version(kms: RunningKms) -> None:
    register(kms.stub("admin"), activate=True)
    issue(kms.stub("backup"), "backup-1")
    event = last_event(kms, "data_key.issue")
    assert (event.actor, event.key_name, event.version, event.backup_id) == (
        "dev-backup",
        KEY,
        1,
        "backup-1",
    )
    assert event.outcome == kms_pb2.AUDIT_OUTCOME_ALLOWED


# ResolveKeyForBackup


def test_resolving_an_unknown_backup_is_not_found(kms: RunningKms) -> None:
    register(kms.stub("admin"), activate=True)
    expect_error(
        lambda: resolve(kms.stub("restore"), "never-issued"), NOT_FOUND, "BACKUP_NOT_FOUND"
    )
    event = last_event(kms, "data_key.resolve")
    assert (event.outcome, event.backup_id) == (kms_pb2.AUDIT_OUTCOME_DENIED, "never-issued")


def test_resolving_is_audited_with_the_bound_version(kms: RunningKms) -> None:
    two_versions_with_backups(kms)
    resolve(kms.stub("restore"), "b1")
    event = last_event(kms, "data_key.resolve")
    assert (event.actor, event.key_name, event.version, event.backup_id) == (
        "dev-restore",
        KEY,
        1,
        "b1",
    )
    assert event.outcome == kms_pb2.AUDIT_OUTCOME_ALLOWED


def test_disabled_version_does_not_resolve_until_enabled_again(kms: RunningKms) -> None:
    issued = two_versions_with_backups(kms)
    restore = kms.stub("restore")
    disable(kms, 1)
    expect_error(lambda: resolve(restore, "b1"), FAILED_PRECONDITION, "KEY_VERSION_DISABLED")
    assert resolve(restore, "b2").data_key == issued[2].data_key
    enable(kms, 1)
    assert resolve(restore, "b1").data_key == issued[1].data_key


def test_disabling_the_active_version_is_refused(kms: RunningKms) -> None:
    two_versions_with_backups(kms)
    expect_error(lambda: disable(kms, 2), FAILED_PRECONDITION, "KEY_VERSION_ACTIVE")
    disable(kms, 1)
    expect_error(lambda: disable(kms, 1), FAILED_PRECONDITION, "ALREADY_DISABLED")
    enable(kms, 1)
    expect_error(lambda: enable(kms, 1), FAILED_PRECONDITION, "ALREADY_ENABLED")


def test_a_disabled_version_keeps_its_backups_from_being_reissued(kms: RunningKms) -> None:
    two_versions_with_backups(kms)
    disable(kms, 1)
    expect_error(
        lambda: issue(kms.stub("backup"), "b1"), FAILED_PRECONDITION, "KEY_VERSION_DISABLED"
    )


def test_destroyed_version_does_not_resolve(kms: RunningKms) -> None:
    two_versions_with_backups(kms)
    destroy(kms, 1)
    expect_error(
        lambda: resolve(kms.stub("restore"), "b1"), FAILED_PRECONDITION, "KEY_VERSION_DESTROYED"
    )


def _forget_binding(kms: RunningKms, backup_id: str) -> None:
    """Simulates a database restored from a snapshot taken before the backup was made."""
    with database(kms) as connection:
        deleted = connection.execute(
            text("DELETE FROM backup_bindings WHERE backup_id = :id"), {"id": backup_id}
        )
        assert deleted.rowcount == 1


def _header(key: kms_pb2.GetActiveKeyResponse) -> kms_pb2.BackupKeyReference:
    return kms_pb2.BackupKeyReference(
        key_name=key.key_name, version=key.version, wrapped_data_key=key.wrapped_data_key
    )


def test_lost_binding_is_recovered_from_the_archive_header(kms: RunningKms) -> None:
    issued = two_versions_with_backups(kms)
    restore = kms.stub("restore")
    _forget_binding(kms, "b1")
    expect_error(lambda: resolve(restore, "b1"), NOT_FOUND, "BACKUP_NOT_FOUND")
    recovered = resolve(restore, "b1", _header(issued[1]))
    assert recovered.recovered
    assert (recovered.key_name, recovered.version) == (KEY, 1)
    assert recovered.data_key == issued[1].data_key
    event = last_event(kms, "data_key.recover_binding")
    assert event.outcome == kms_pb2.AUDIT_OUTCOME_ALLOWED
    assert (event.actor, event.backup_id, event.key_name, event.version) == (
        "dev-restore",
        "b1",
        KEY,
        1,
    )
    # The binding is back: resolving needs no header any more, and is not a recovery.
    again = resolve(restore, "b1")
    assert (again.recovered, again.data_key) == (False, issued[1].data_key)
    # and the backup id is bound again: the backup role cannot reuse it (nor read its key).
    expect_error(
        lambda: issue(kms.stub("backup"), "b1"), grpc.StatusCode.ALREADY_EXISTS, "BACKUP_ID_IN_USE"
    )


def test_recovery_with_another_backups_wrapped_key_is_refused(kms: RunningKms) -> None:
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    victim = issue(backup, "victim")
    other = issue(backup, "other")
    _forget_binding(kms, "victim")
    error = expect_error(
        lambda: resolve(restore, "victim", _header(other)),
        INVALID_ARGUMENT,
        "RECOVERY_KEY_MISMATCH",
    )
    assert other.wrapped_data_key.hex() not in message_of(error)
    expect_error(lambda: resolve(restore, "victim"), NOT_FOUND, "BACKUP_NOT_FOUND")
    event = last_event(kms, "data_key.recover_binding")
    assert (event.outcome, event.status_code) == (kms_pb2.AUDIT_OUTCOME_DENIED, "INVALID_ARGUMENT")
    assert resolve(restore, "victim", _header(victim)).recovered


@pytest.mark.parametrize(
    ("change", "code", "reason"),
    [
        ({"version": 2}, NOT_FOUND, "BACKUP_NOT_FOUND"),
        ({"key_name": "other-key"}, NOT_FOUND, "BACKUP_NOT_FOUND"),
        ({"wrapped_data_key": b""}, INVALID_ARGUMENT, "RECOVERY_KEY_MISMATCH"),
        ({"wrapped_data_key": b"\x01" + b"\x00" * 60}, INVALID_ARGUMENT, "RECOVERY_KEY_MISMATCH"),
        ({"version": 0}, INVALID_ARGUMENT, "VERSION_INVALID"),
        ({"key_name": "bad name"}, INVALID_ARGUMENT, "KEY_NAME_INVALID"),
    ],
)
def test_recovery_with_a_wrong_header_is_refused(
    kms: RunningKms, change: dict[str, object], code: grpc.StatusCode, reason: str
) -> None:
    register(kms.stub("admin"), activate=True)
    issued = issue(kms.stub("backup"), "b1")
    _forget_binding(kms, "b1")
    header = _header(issued)
    for field, value in change.items():
        setattr(header, field, value)
    expect_error(lambda: resolve(kms.stub("restore"), "b1", header), code, reason)
    expect_error(lambda: resolve(kms.stub("restore"), "b1"), NOT_FOUND, "BACKUP_NOT_FOUND")


def test_recovery_under_a_wrong_version_of_the_same_key_is_refused(kms: RunningKms) -> None:
    issued = two_versions_with_backups(kms)
    _forget_binding(kms, "b1")
    header = _header(issued[1])
    header.version = 2
    expect_error(
        lambda: resolve(kms.stub("restore"), "b1", header),
        INVALID_ARGUMENT,
        "RECOVERY_KEY_MISMATCH",
    )


def test_a_destroyed_version_stays_unrecoverable(kms: RunningKms) -> None:
    issued = two_versions_with_backups(kms)
    destroy(kms, 1)
    _forget_binding(kms, "b1")
    expect_error(
        lambda: resolve(kms.stub("restore"), "b1", _header(issued[1])),
        FAILED_PRECONDITION,
        "KEY_VERSION_DESTROYED",
    )


def test_a_disabled_version_is_not_recovered_until_enabled(kms: RunningKms) -> None:
    issued = two_versions_with_backups(kms)
    disable(kms, 1)
    _forget_binding(kms, "b1")
    restore = kms.stub("restore")
    expect_error(
        lambda: resolve(restore, "b1", _header(issued[1])),
        FAILED_PRECONDITION,
        "KEY_VERSION_DISABLED",
    )
    enable(kms, 1)
    assert resolve(restore, "b1", _header(issued[1])).data_key == issued[1].data_key


def test_a_header_is_ignored_while_the_binding_exists(kms: RunningKms) -> None:
    issued = two_versions_with_backups(kms)
    resolved = resolve(kms.stub("restore"), "b1", _header(issued[2]))
    assert (resolved.version, resolved.recovered) == (1, False)
    assert resolved.data_key == issued[1].data_key


# DestroyKeyVersion


def test_destroying_the_active_version_is_refused(kms: RunningKms) -> None:
    issued = two_versions_with_backups(kms)
    expect_error(lambda: destroy(kms, 2), FAILED_PRECONDITION, "KEY_VERSION_ACTIVE")
    assert resolve(kms.stub("restore"), "b2").data_key == issued[2].data_key
    event = last_event(kms, "key_version.schedule_destroy")
    assert (event.outcome, event.version) == (kms_pb2.AUDIT_OUTCOME_DENIED, 2)


def test_destroy_erases_the_material_and_only_its_own_backups_fail(kms: RunningKms) -> None:
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    register(admin, "other-key", activate=True)
    issued = {"v1": issue(backup, "v1-backup"), "other": issue(backup, "other-backup", "other-key")}
    register(admin)
    register(admin)
    rotate(admin, 2)
    issued["v2"] = issue(backup, "v2-backup")
    rotate(admin, 3)
    issued["v3"] = issue(backup, "v3-backup")

    destroyed = destroy(kms, 1)
    assert destroyed.state == kms_pb2.KEY_VERSION_STATE_DESTROYED
    assert destroyed.HasField("destroy_time")

    with database(kms) as connection:
        rows: dict[int, bytes | None] = dict(
            connection.execute(
                text("SELECT version, wrapped_material FROM key_versions WHERE key_name = :k"),
                {"k": KEY},
            ).all()
        )
    assert rows[1] is None
    assert rows[2] is not None and rows[3] is not None

    expect_error(
        lambda: resolve(restore, "v1-backup"), FAILED_PRECONDITION, "KEY_VERSION_DESTROYED"
    )
    for name, backup_id in (("v2", "v2-backup"), ("v3", "v3-backup"), ("other", "other-backup")):
        assert resolve(restore, backup_id).data_key == issued[name].data_key

    event = last_event(kms, "key_version.destroy")
    assert (event.outcome, event.actor, event.version, event.reason) == (
        kms_pb2.AUDIT_OUTCOME_ALLOWED,
        "dev-admin",
        1,
        "shred",
    )


def test_a_destroyed_version_cannot_be_enabled_rotated_to_or_destroyed_again(
    kms: RunningKms,
) -> None:
    two_versions_with_backups(kms)
    destroy(kms, 1)
    expect_error(lambda: enable(kms, 1), FAILED_PRECONDITION, "KEY_VERSION_DESTROYED")
    expect_error(lambda: disable(kms, 1), FAILED_PRECONDITION, "KEY_VERSION_DESTROYED")
    expect_error(lambda: destroy(kms, 1), FAILED_PRECONDITION, "KEY_VERSION_DESTROYED")
    expect_error(lambda: rotate(kms.stub("admin"), 1), FAILED_PRECONDITION, "KEY_VERSION_DESTROYED")
    listed = versions(kms.stub("admin"))
    assert [(v.version, v.state, v.active) for v in listed] == [
        (1, kms_pb2.KEY_VERSION_STATE_DESTROYED, False),
        (2, kms_pb2.KEY_VERSION_STATE_ENABLED, True),
    ]


def test_a_disabled_version_can_be_destroyed(kms: RunningKms) -> None:
    two_versions_with_backups(kms)
    disable(kms, 1)
    assert destroy(kms, 1).state == kms_pb2.KEY_VERSION_STATE_DESTROYED


def test_destroying_an_unknown_version_is_not_found(kms: RunningKms) -> None:
    two_versions_with_backups(kms)
    expect_error(lambda: destroy(kms, 3), NOT_FOUND, "KEY_VERSION_NOT_FOUND")
    expect_error(lambda: destroy(kms, 1, "no-such-key"), NOT_FOUND, "KEY_NOT_FOUND")


# Tampered wrapped blobs fail closed


def _wrapped_material(kms: RunningKms, version: int) -> bytes:
    with database(kms) as connection:
        blob = connection.execute(
            text("SELECT wrapped_material FROM key_versions WHERE key_name = :k AND version = :v"),
            {"k": KEY, "v": version},
        ).scalar_one()
    return bytes(blob)


def _set_wrapped_material(kms: RunningKms, version: int, blob: bytes) -> None:
    with database(kms) as connection:
        connection.execute(
            text(
                "UPDATE key_versions SET wrapped_material = :b WHERE key_name = :k AND version = :v"
            ),
            {"b": blob, "k": KEY, "v": version},
        )


def _flip(blob: bytes, position: int) -> bytes:
    return blob[:position] + bytes([blob[position] ^ 0x01]) + blob[position + 1 :]


# Root-key blobs are 0x02, an 8-byte root key id, a 12-byte nonce, then ciphertext and tag
# (an edited key id names a root key the server lacks: ROOT_KEY_MISSING, in test_root_key_rotation).
@pytest.mark.parametrize("position", [12, 30, -1], ids=["nonce", "ciphertext", "tag"])
def test_an_edited_version_blob_fails_closed_with_data_loss(kms: RunningKms, position: int) -> None:
    issued = two_versions_with_backups(kms)
    blob = _wrapped_material(kms, 1)
    _set_wrapped_material(kms, 1, _flip(blob, position % len(blob)))
    restore = kms.stub("restore")
    error = expect_error(lambda: resolve(restore, "b1"), DATA_LOSS, "WRAPPED_BLOB_INTEGRITY")
    assert blob.hex() not in message_of(error)
    # The server keeps serving everything that is intact.
    assert resolve(restore, "b2").data_key == issued[2].data_key
    assert issue(kms.stub("backup"), "b3").version == 2
    event = last_event(kms, "data_key.resolve")
    assert (event.outcome, event.status_code) == (kms_pb2.AUDIT_OUTCOME_ALLOWED, "OK")
    _set_wrapped_material(kms, 1, blob)
    assert resolve(restore, "b1").data_key == issued[1].data_key


def test_an_edited_active_version_blob_stops_issuing(kms: RunningKms) -> None:
    two_versions_with_backups(kms)
    _set_wrapped_material(kms, 2, _flip(_wrapped_material(kms, 2), 30))
    backup = kms.stub("backup")
    expect_error(lambda: issue(backup, "new-backup"), DATA_LOSS, "WRAPPED_BLOB_INTEGRITY")
    expect_error(lambda: issue(backup, "b2"), DATA_LOSS, "WRAPPED_BLOB_INTEGRITY")
    expect_error(lambda: resolve(kms.stub("restore"), "new-backup"), NOT_FOUND, "BACKUP_NOT_FOUND")
    event = last_event(kms, "data_key.issue")
    assert (event.outcome, event.status_code) == (kms_pb2.AUDIT_OUTCOME_DENIED, "DATA_LOSS")
    assert resolve(kms.stub("restore"), "b1").version == 1


def test_a_version_blob_copied_onto_another_version_fails_closed(kms: RunningKms) -> None:
    issued = two_versions_with_backups(kms)
    _set_wrapped_material(kms, 1, _wrapped_material(kms, 2))
    restore = kms.stub("restore")
    expect_error(lambda: resolve(restore, "b1"), DATA_LOSS, "WRAPPED_BLOB_INTEGRITY")
    assert resolve(restore, "b2").data_key == issued[2].data_key


def test_a_version_blob_copied_onto_another_key_fails_closed(kms: RunningKms) -> None:
    issued = two_versions_with_backups(kms)
    admin = kms.stub("admin")
    register(admin, "other-key", activate=True)
    with database(kms) as connection:
        connection.execute(
            text(
                "UPDATE key_versions SET wrapped_material = (SELECT wrapped_material FROM "
                "key_versions WHERE key_name = 'other-key' AND version = 1) "
                "WHERE key_name = :k AND version = 1"
            ),
            {"k": KEY},
        )
    expect_error(lambda: resolve(kms.stub("restore"), "b1"), DATA_LOSS, "WRAPPED_BLOB_INTEGRITY")
    assert resolve(kms.stub("restore"), "b2").data_key == issued[2].data_key


def test_a_truncated_version_blob_fails_closed(kms: RunningKms) -> None:
    two_versions_with_backups(kms)
    _set_wrapped_material(kms, 1, b"\x01abc")
    expect_error(lambda: resolve(kms.stub("restore"), "b1"), DATA_LOSS, "WRAPPED_BLOB_MALFORMED")


def test_a_binding_moved_to_another_backup_fails_closed(kms: RunningKms) -> None:
    """Copying one backup's wrapped data key onto another's binding does not hand it out."""
    issued = two_versions_with_backups(kms)
    backup = kms.stub("backup")
    issue(backup, "b3")
    with database(kms) as connection:
        connection.execute(
            text("UPDATE backup_bindings SET wrapped_data_key = :w WHERE backup_id = 'b3'"),
            {"w": issued[2].wrapped_data_key},
        )
    expect_error(lambda: resolve(kms.stub("restore"), "b3"), DATA_LOSS, "WRAPPED_BLOB_INTEGRITY")
    expect_error(lambda: issue(backup, "b3"), DATA_LOSS, "WRAPPED_BLOB_INTEGRITY")
    assert resolve(kms.stub("restore"), "b2").data_key == issued[2].data_key


def test_a_binding_pointed_at_another_version_fails_closed(kms: RunningKms) -> None:
    issued = two_versions_with_backups(kms)
    with database(kms) as connection:
        connection.execute(text("UPDATE backup_bindings SET version = 2 WHERE backup_id = 'b1'"))
    expect_error(lambda: resolve(kms.stub("restore"), "b1"), DATA_LOSS, "WRAPPED_BLOB_INTEGRITY")
    assert resolve(kms.stub("restore"), "b2").data_key == issued[2].data_key
