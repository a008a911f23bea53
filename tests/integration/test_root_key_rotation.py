"""Root-key rotation through the real server and the real `kms-server rewrap-root-keys`, on
SQLite and PostgreSQL: every blob moves to the new key in audited batches, the log stays
intact, and afterwards a server starts with the new key alone."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from kms.v1 import kms_pb2
from server.keystore import crypto
from server.keystore.root_keys import load_keyring
from server.root_rotation import rewrap_root_keys
from tests.conftest import RunningKms, start_kms
from tests.integration.kms_helpers import (
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
from tests.integration.legacy_fixture import legacy_data_dir
from tests.integration.root_key_support import (
    DataKeyLoad,
    check_value_names,
    key_id,
    new_root_key_file,
    rewrap,
    root_key_ids_of_blobs,
)

KEYS = ("tenant-a", "tenant-b", "tenant-c")


def _seed(kms: RunningKms) -> dict[str, bytes]:
    """Three keys, two versions each (the second active), and a backup under each version."""
    admin, backup = kms.stub("admin"), kms.stub("backup")
    issued: dict[str, bytes] = {}
    for name in KEYS:
        register(admin, name, activate=True)
        issued[f"{name}-v1"] = issue(backup, f"{name}-v1", name).data_key
        register(admin, name)
        rotate(admin, 2, name, reason="seed")
        issued[f"{name}-v2"] = issue(backup, f"{name}-v2", name).data_key
    return issued


def _rewrap_events(kms: RunningKms) -> list[kms_pb2.AuditEvent]:
    return [e for e in all_audit_events(kms.stub("auditor")) if e.action == "root_key.rewrap"]


def _restart(kms: RunningKms, **keys: str) -> RunningKms:
    kms.close()
    return start_kms(kms.data_dir, kms.database_url, **keys)


def test_rotation_rewraps_every_blob_in_audited_batches_and_the_new_key_then_serves_alone(
    tmp_path: Path, database_url: str
) -> None:
    kms = start_kms(tmp_path / "kms", database_url)
    old = kms.settings.root_key_file
    new = new_root_key_file(tmp_path / "new.key")
    try:
        issued = _seed(kms)
        kms = _restart(kms, root_key_file=str(new), previous_root_key_file=str(old))
        # The new key's check value was recorded, and audited, when the server first started on it.
        records = [
            e for e in all_audit_events(kms.stub("auditor")) if e.action == "root_key.record"
        ]
        assert [e.detail for e in records] == [
            f"root key {key_id(new)} recorded as the current root key"
        ]
        # A version registered during the rotation is wrapped under the new key at once.
        register(kms.stub("admin"), "tenant-d", activate=True)
        issued["tenant-d-v1"] = issue(kms.stub("backup"), "tenant-d-v1", "tenant-d").data_key
        assert root_key_ids_of_blobs(kms) == {key_id(old): 6 + 3, key_id(new): 1}

        flags = ["--root-key-file", str(new), "--previous-root-key-file", str(old)]
        first = rewrap(kms, flags, batch_size=4)
        assert "6 key versions to rewrap" in first.stdout
        assert "rewrapped 3 server secrets" in first.stdout
        assert f"no blob needs root key {key_id(old)} any more" in first.stdout
        assert root_key_ids_of_blobs(kms) == {key_id(new): 6 + 3 + 1}
        assert check_value_names(kms) == [f"root_key_check/{key_id(new)}"]
        # Idempotent: a second run finds nothing, changes nothing, records nothing.
        rewraps = _rewrap_events(kms)
        second = rewrap(kms, flags)
        assert "0 key versions to rewrap" in second.stdout
        assert "no blob needs" not in second.stdout
        assert _rewrap_events(kms) == rewraps

        # Secrets, two batches of versions (4 + 2), and the retirement of the old key.
        assert [e.detail.split(" under")[0] for e in rewraps[:3]] == [
            "rewrapped 3 server secrets",
            "rewrapped 4 key versions",
            "rewrapped 2 key versions",
        ]
        assert key_id(old) in rewraps[3].detail and rewraps[3].actor == "system:rewrap-root-keys"
        # The running server keeps serving, from its cache and after it expires, and the
        # keyed chain and the sealed state are intact.
        for backup_id, data_key in issued.items():
            assert resolve(kms.stub("restore"), backup_id).data_key == data_key
        assert verify(kms).intact, verify(kms).problem

        kms = _restart(kms, root_key_file=str(new))
        for backup_id, data_key in issued.items():
            assert resolve(kms.stub("restore"), backup_id).data_key == data_key
        assert issue(kms.stub("backup"), "after", "tenant-a").version == 2
        assert verify(kms).intact, verify(kms).problem
    finally:
        kms.close()
    # The old key alone no longer opens this database, and says which key it needs.
    with pytest.raises(crypto.RootKeyError, match=key_id(new)):
        start_kms(kms.data_dir, kms.database_url, root_key_file=str(old))


def test_a_server_missing_a_root_key_the_database_needs_refuses_to_start_naming_it(
    tmp_path: Path, database_url: str
) -> None:
    kms = start_kms(tmp_path / "kms", database_url)
    old = kms.settings.root_key_file
    new = new_root_key_file(tmp_path / "new.key")
    kms = _restart(kms, root_key_file=str(new), previous_root_key_file=str(old))
    kms.close()
    # Without the rewrap, the old key still wraps the server's secrets and any versions.
    with pytest.raises(crypto.RootKeyError, match=f"root key {key_id(old)}"):
        start_kms(kms.data_dir, kms.database_url, root_key_file=str(new))
    with pytest.raises(crypto.RootKeyError, match=f"root key {key_id(new)}"):
        start_kms(kms.data_dir, kms.database_url, root_key_file=str(old))
    # Both keys: it starts again.
    start_kms(kms.data_dir, kms.database_url, root_key_file=str(old),
              previous_root_key_file=str(new)).close()  # fmt: skip


def test_a_blob_under_a_root_key_the_server_lacks_fails_that_one_call_naming_the_key(
    tmp_path: Path, database_url: str
) -> None:
    kms = start_kms(tmp_path / "kms", database_url)
    old = kms.settings.root_key_file
    new = new_root_key_file(tmp_path / "new.key")
    try:
        issued = _seed(kms)
        with database(kms) as connection:
            (stale,) = connection.execute(
                text(
                    "SELECT wrapped_material FROM key_versions "
                    "WHERE key_name = 'tenant-b' AND version = 1"
                )
            ).one()
        kms = _restart(kms, root_key_file=str(new), previous_root_key_file=str(old))
        rewrap(kms, ["--root-key-file", str(new), "--previous-root-key-file", str(old)])
        kms = _restart(kms, root_key_file=str(new))
        # An old copy of one blob put back (a partial restore): only the calls that need it fail.
        with database(kms) as connection:
            connection.execute(
                text(
                    "UPDATE key_versions SET wrapped_material = :blob "
                    "WHERE key_name = 'tenant-b' AND version = 1"
                ),
                {"blob": stale},
            )
        error = expect_error(
            lambda: resolve(kms.stub("restore"), "tenant-b-v1"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "ROOT_KEY_MISSING",
        )
        assert f"root key {key_id(old)}" in message_of(error)
        assert resolve(kms.stub("restore"), "tenant-b-v2").data_key == issued["tenant-b-v2"]
        assert resolve(kms.stub("restore"), "tenant-a-v1").data_key == issued["tenant-a-v1"]
    finally:
        kms.close()


def test_rotation_under_a_load_of_data_key_calls_fails_no_call(
    tmp_path: Path, database_url: str
) -> None:
    kms = start_kms(tmp_path / "kms", database_url, material_cache_seconds="1")
    old = kms.settings.root_key_file
    new = new_root_key_file(tmp_path / "new.key")
    try:
        issued = _seed(kms)
        kms = _restart(
            kms,
            root_key_file=str(new),
            previous_root_key_file=str(old),
            material_cache_seconds="1",
        )
        load = DataKeyLoad([kms], issued, "tenant-a").start()
        try:
            time.sleep(1)
            rewrap(kms, ["--root-key-file", str(new), "--previous-root-key-file", str(old)],
                   batch_size=1)  # fmt: skip
            time.sleep(2)  # past the cache's bound: material unwrapped again under the new key
        finally:
            load.stop()
        assert not load.failures, load.failures[:5]
        assert load.calls > 30
        assert verify(kms).intact, verify(kms).problem
        kms = _restart(kms, root_key_file=str(new))
        for backup_id, data_key in issued.items():
            assert resolve(kms.stub("restore"), backup_id).data_key == data_key
    finally:
        kms.close()


@pytest.mark.postgres
def test_two_replicas_on_postgres_serve_through_a_rotation_and_restart_with_the_new_key(
    tmp_path: Path, database_url: str
) -> None:
    if not database_url:
        pytest.skip("two replicas share one PostgreSQL database")
    first = start_kms(tmp_path / "kms", database_url, material_cache_seconds="1")
    old = first.settings.root_key_file
    new = new_root_key_file(tmp_path / "new.key")
    issued = _seed(first)
    first.close()
    both = {"root_key_file": str(new), "previous_root_key_file": str(old)}
    replicas = [
        start_kms(tmp_path / "kms", database_url, material_cache_seconds="1", **both)
        for _ in range(2)
    ]
    try:
        load = DataKeyLoad(replicas, issued, "tenant-c").start()
        try:
            time.sleep(1)
            rewrap(replicas[0], ["--root-key-file", str(new), "--previous-root-key-file",
                                 str(old)], batch_size=1)  # fmt: skip
            time.sleep(2)
        finally:
            load.stop()
        assert not load.failures, load.failures[:5]
        assert load.calls > 30
        assert root_key_ids_of_blobs(replicas[0]) == {key_id(new): 9}
    finally:
        for replica in replicas:
            replica.close()
    replicas = [start_kms(tmp_path / "kms", database_url, root_key_file=str(new)) for _ in range(2)]
    try:
        for replica in replicas:
            for backup_id, data_key in issued.items():
                assert resolve(replica.stub("restore"), backup_id).data_key == data_key
        assert verify(replicas[1]).intact
    finally:
        for replica in replicas:
            replica.close()


def test_a_database_from_before_key_ids_rotates_off_its_format_1_root_key(
    tmp_path: Path,
) -> None:
    data_dir = legacy_data_dir(tmp_path)
    old = data_dir / "root.key"
    new = new_root_key_file(tmp_path / "new.key")
    shutil.copy(old, tmp_path / "old.key")
    kms = start_kms(data_dir, "", root_key_file=str(new), previous_root_key_file=str(old))
    try:
        assert "format-1" in root_key_ids_of_blobs(kms)
        rewrap(kms, ["--root-key-file", str(new), "--previous-root-key-file", str(old)])
        assert root_key_ids_of_blobs(kms) == {key_id(new): sum(root_key_ids_of_blobs(kms).values())}
        assert check_value_names(kms) == [f"root_key_check/{key_id(new)}"]
        kms = _restart(kms, root_key_file=str(new))
        assert verify(kms).intact, verify(kms).problem
    finally:
        kms.close()


class _Stopped(Exception):
    pass


def test_a_rewrap_stopped_after_a_batch_resumes_where_it_stopped(
    tmp_path: Path, database_url: str
) -> None:
    kms = start_kms(tmp_path / "kms", database_url)
    old = kms.settings.root_key_file
    new = new_root_key_file(tmp_path / "new.key")
    try:
        issued = _seed(kms)
        kms = _restart(kms, root_key_file=str(new), previous_root_key_file=str(old))
        keyring = load_keyring(kms.settings)
        assert kms.server.service is not None
        integrity = kms.server.service.server_keys.integrity()

        def stop_after_first_batch(line: str) -> None:
            if line.startswith("rewrapped 2 of"):
                raise _Stopped  # as if the process were killed after that batch committed

        with pytest.raises(_Stopped):
            rewrap_root_keys(
                kms.server.engine, keyring, integrity, batch_size=2, report=stop_after_first_batch
            )
        assert root_key_ids_of_blobs(kms) == {key_id(old): 4, key_id(new): 2 + 3}
        assert f"root_key_check/{key_id(old)}" in check_value_names(kms)
        lines: list[str] = []
        result = rewrap_root_keys(
            kms.server.engine, keyring, integrity, batch_size=2, report=lines.append
        )
        assert (result.secrets_rewrapped, result.versions_rewrapped) == (0, 4)
        assert result.retired_key_ids == [key_id(old)]
        assert "4 key versions to rewrap under root key " + key_id(new) in lines
        assert verify(kms).intact, verify(kms).problem
        kms = _restart(kms, root_key_file=str(new))
        for backup_id, data_key in issued.items():
            assert resolve(kms.stub("restore"), backup_id).data_key == data_key
    finally:
        kms.close()
