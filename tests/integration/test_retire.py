"""RewrapBackups: bounded batches, resumable and idempotent, safe beside data-key calls; the
recovery path afterwards."""

from __future__ import annotations

import threading

import grpc
from sqlalchemy import text

from kms.v1 import kms_pb2
from tests.conftest import RunningKms
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


def _rewrap(
    kms: RunningKms, from_version: int = 1, batch: int = 0
) -> kms_pb2.RewrapBackupsResponse:
    reply: kms_pb2.RewrapBackupsResponse = kms.stub("admin").RewrapBackups(
        kms_pb2.RewrapBackupsRequest(key_name=KEY, from_version=from_version, batch_size=batch)
    )
    return reply


def _count(kms: RunningKms, version: int) -> int:
    reply = kms.stub("admin").GetKeyVersion(
        kms_pb2.GetKeyVersionRequest(key_name=KEY, version=version)
    )
    return int(reply.key_version.backup_count)


def test_batches_move_every_backup_and_a_rerun_changes_nothing(kms: RunningKms) -> None:
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    keys = {f"b-{n:02}": issue(backup, f"b-{n:02}").data_key for n in range(7)}
    register(admin)
    rotate(admin, 2)
    assert _count(kms, 1) == 7

    progress = [_rewrap(kms, batch=3) for _ in range(3)]
    assert [(p.rewrapped, p.remaining, p.to_version) for p in progress] == [
        (3, 4, 2),
        (3, 1, 2),
        (1, 0, 2),
    ]
    again = _rewrap(kms, batch=3)
    assert (again.rewrapped, again.remaining) == (0, 0)
    assert (_count(kms, 1), _count(kms, 2)) == (0, 7)
    # The same data keys, now bound to version 2.
    for backup_id, data_key in keys.items():
        resolved = resolve(restore, backup_id)
        assert (resolved.version, resolved.data_key) == (2, data_key)
    details = [
        e.detail for e in all_audit_events(kms.stub("auditor"), KEY) if e.action == "backup.rewrap"
    ]
    # Version 2 wrapped no data key before: the count after the first batch is its 3.
    assert details[0] == (
        "rewrapped 3 backups from version 1 to version 2; 4 remain (data_keys_wrapped=3)"
    )
    assert len(details) == 4
    # A retry of the backup that made one (within its window) still gets the same key: the
    # rewrapped binding is sealed again, not left under its old MAC.
    retried = issue(backup, "b-00")
    assert (retried.version, retried.data_key) == (2, keys["b-00"])
    # Nothing depends on version 1: destroying it loses no backup.
    admin.DestroyKeyVersion(kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=1))
    assert resolve(restore, "b-00").data_key == keys["b-00"]
    assert verify(kms).intact


def test_a_disabled_version_can_be_retired_but_not_the_active_or_a_destroyed_one(
    kms: RunningKms,
) -> None:
    admin, backup = kms.stub("admin"), kms.stub("backup")
    register(admin, activate=True)
    issue(backup, "b-1")
    expect_error(lambda: _rewrap(kms), grpc.StatusCode.FAILED_PRECONDITION, "KEY_VERSION_ACTIVE")
    register(admin)
    rotate(admin, 2)
    admin.DisableKeyVersion(kms_pb2.DisableKeyVersionRequest(key_name=KEY, version=1))
    assert _rewrap(kms).remaining == 0
    register(admin)
    rotate(admin, 3)
    admin.DestroyKeyVersion(kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=1))
    expect_error(lambda: _rewrap(kms), grpc.StatusCode.FAILED_PRECONDITION, "KEY_VERSION_DESTROYED")
    expect_error(lambda: _rewrap(kms, 9), grpc.StatusCode.NOT_FOUND, "KEY_VERSION_NOT_FOUND")
    expect_error(
        lambda: kms.stub("backup").RewrapBackups(
            kms_pb2.RewrapBackupsRequest(key_name=KEY, from_version=2)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


def test_rewrapping_beside_get_active_key_and_resolve_loses_nothing(kms: RunningKms) -> None:
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    old = {f"old-{n}": issue(backup, f"old-{n}").data_key for n in range(40)}
    register(admin)
    rotate(admin, 2)
    failures: list[BaseException] = []
    issued: dict[str, bytes] = {}

    def traffic(worker: int) -> None:
        try:
            for n in range(20):
                backup_id = f"old-{(worker * 7 + n) % 40}"
                assert resolve(restore, backup_id).data_key == old[backup_id]
                # A repeated GetActiveKey returns the existing (possibly rewrapped) binding.
                assert issue(backup, backup_id).data_key == old[backup_id]
                new_id = f"new-{worker}-{n}"
                issued[new_id] = issue(backup, new_id).data_key
        except BaseException as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    while _rewrap(kms, batch=5).remaining:
        pass
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert _count(kms, 1) == 0
    for backup_id, data_key in {**old, **issued}.items():
        assert resolve(restore, backup_id).data_key == data_key


def test_recovery_from_a_header_works_while_its_version_is_usable(kms: RunningKms) -> None:
    """A binding lost to a database restore comes back from the archive header (old version)."""
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    made = issue(backup, "lost")
    register(admin)
    rotate(admin, 2)
    with database(kms) as connection:
        connection.execute(text("DELETE FROM backup_bindings WHERE backup_id = 'lost'"))
    header = kms_pb2.BackupKeyReference(
        key_name=KEY, version=1, wrapped_data_key=made.wrapped_data_key
    )
    recovered = resolve(restore, "lost", header)
    assert (recovered.recovered, recovered.data_key) == (True, made.data_key)


def test_recovery_says_what_happened_when_the_headers_version_was_retired_and_destroyed(
    kms: RunningKms,
) -> None:
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    made = issue(backup, "retired")
    register(admin)
    rotate(admin, 2)
    assert _rewrap(kms).remaining == 0
    admin.DestroyKeyVersion(kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=1))
    with database(kms) as connection:
        connection.execute(text("DELETE FROM backup_bindings WHERE backup_id = 'retired'"))
    header = kms_pb2.BackupKeyReference(
        key_name=KEY, version=1, wrapped_data_key=made.wrapped_data_key
    )
    error = expect_error(
        lambda: resolve(restore, "retired", header),
        grpc.StatusCode.FAILED_PRECONDITION,
        "KEY_VERSION_DESTROYED",
    )
    message = message_of(error)
    assert "binding" in message and "version 1, was destroyed" in message
