"""After a destroy: no copy of the wrapped material on disk (SQLite's file and WAL), none of
the unwrapped material in this process's cache, and every cached copy wiped in time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text

from kms.v1 import kms_pb2
from server.service import KeyManagementService
from tests.conftest import RunningKms, start_kms
from tests.integration.kms_helpers import KEY, database, issue, register, resolve, rotate


def _wrapped_material(kms: RunningKms, version: int) -> bytes:
    with database(kms) as connection:
        blob = connection.execute(
            text("SELECT wrapped_material FROM key_versions WHERE key_name = :k AND version = :v"),
            {"k": KEY, "v": version},
        ).scalar_one()
    return bytes(blob)


def _service(kms: RunningKms) -> KeyManagementService:
    assert kms.server.service is not None
    return kms.server.service


def _cached(kms: RunningKms, version: int) -> bytearray:
    entry = _service(kms).materials._cache._entries.get((KEY, version))
    assert entry is not None, f"version {version} is not cached"
    return entry.material


def _version_one_in_use(kms: RunningKms) -> None:
    """Version 1 made, used (so its material is cached), then replaced as the active one."""
    admin = kms.stub("admin")
    register(admin, activate=True)
    issue(kms.stub("backup"), "b-1")
    register(admin)
    rotate(admin, 2)


def test_after_a_destroy_the_blob_is_in_no_file_of_the_data_directory(kms: RunningKms) -> None:
    if not kms.database_url.startswith("sqlite"):
        pytest.skip("the data directory holds the database only on SQLite")
    _version_one_in_use(kms)
    blob = _wrapped_material(kms, 1)
    files = [path for path in kms.data_dir.rglob("*") if path.is_file()]
    assert any(blob in path.read_bytes() for path in files)  # the check can see it
    kms.stub("admin").DestroyKeyVersion(kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=1))
    for path in kms.data_dir.rglob("*"):
        if path.is_file():
            assert blob not in path.read_bytes(), f"the destroyed blob is still in {path.name}"
    wal = kms.data_dir / "kms.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0


def test_the_destroying_process_evicts_and_wipes_the_material(kms: RunningKms) -> None:
    _version_one_in_use(kms)
    material = _cached(kms, 1)
    assert any(material)
    kms.stub("admin").DestroyKeyVersion(kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=1))
    assert (KEY, 1) not in _service(kms).materials._cache._entries
    _service(kms).materials._cache.sweep()  # what the sweeper thread does within a second
    assert material == bytearray(len(material)), "the evicted buffer was not zeroed"


def test_cached_material_is_dropped_and_wiped_within_the_bound(
    tmp_path: Path, database_url: str
) -> None:
    """What bounds a replica that did not do the destroy: nothing outlives the setting."""
    kms = start_kms(tmp_path / "kms", database_url, material_cache_seconds="1")
    try:
        register(kms.stub("admin"), activate=True)
        issue(kms.stub("backup"), "b-1")
        material = _cached(kms, 1)
        deadline = time.monotonic() + 5
        while any(material) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(material), "cached material outlived --material-cache-seconds"
        assert (KEY, 1) not in _service(kms).materials._cache._entries
        # The next call unwraps again and works.
        assert resolve(kms.stub("restore"), "b-1").version == 1
    finally:
        kms.close()


def test_a_zero_second_cache_keeps_nothing(tmp_path: Path) -> None:
    kms = start_kms(tmp_path / "kms", material_cache_seconds="0")
    try:
        register(kms.stub("admin"), activate=True)
        issue(kms.stub("backup"), "b-1")
        assert not _service(kms).materials._cache._entries
    finally:
        kms.close()


def test_a_scheduled_destruction_carried_out_by_the_scheduler_shreds_as_well(
    tmp_path: Path,
) -> None:
    kms = start_kms(tmp_path / "kms", destroy_delay="1s")
    try:
        _version_one_in_use(kms)
        blob = _wrapped_material(kms, 1)
        material = _cached(kms, 1)
        kms.stub("admin").DestroyKeyVersion(
            kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=1)
        )
        assert any(blob in p.read_bytes() for p in kms.data_dir.rglob("*") if p.is_file())
        deadline = time.monotonic() + 20
        while (KEY, 1) in _service(kms).materials._cache._entries:
            assert time.monotonic() < deadline, "the scheduler did not carry out the destruction"
            time.sleep(0.05)
        _service(kms).materials._cache.sweep()
        assert material == bytearray(len(material)), "the evicted buffer was not zeroed"

        def holding_the_blob() -> list[str]:
            files = [path for path in kms.data_dir.rglob("*") if path.is_file()]
            return [path.name for path in files if blob in path.read_bytes()]

        # The scheduler evicts, then truncates the WAL, right after its commit.
        while holding_the_blob():
            assert time.monotonic() < deadline, f"the blob is still in {holding_the_blob()}"
            time.sleep(0.05)
    finally:
        kms.close()
