"""Envelope encryption: every blob is bound to what it belongs to by its associated data."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from server.domain.errors import IntegrityFailure
from server.keystore import crypto

MATERIAL = bytes(range(32))


def root_key() -> crypto.RootKey:
    return crypto.RootKey(os.urandom(32))


def test_version_material_round_trips_under_its_own_name_and_version() -> None:
    root = root_key()
    blob = root.wrap_version_material("tenant-a", 3, MATERIAL)
    assert root.unwrap_version_material("tenant-a", 3, blob) == MATERIAL
    assert MATERIAL not in blob


@pytest.mark.parametrize(
    ("key_name", "version"), [("tenant-b", 3), ("tenant-a", 4), ("tenant-a3", 3)]
)
def test_version_material_does_not_unwrap_under_another_name_or_version(
    key_name: str, version: int
) -> None:
    root = root_key()
    blob = root.wrap_version_material("tenant-a", 3, MATERIAL)
    with pytest.raises(IntegrityFailure) as caught:
        root.unwrap_version_material(key_name, version, blob)
    assert caught.value.reason == "WRAPPED_BLOB_INTEGRITY"
    assert caught.value.status_name == "DATA_LOSS"


def test_associated_data_parts_are_length_prefixed() -> None:
    """("ab", "c") and ("a", "bc") must not encode alike."""
    root = root_key()
    data_key = os.urandom(32)
    blob = crypto.wrap_data_key(MATERIAL, "ab", "c", 1, data_key)
    with pytest.raises(IntegrityFailure):
        crypto.unwrap_data_key(MATERIAL, "a", "bc", 1, blob)
    assert root.unwrap_version_material("k", 1, root.wrap_version_material("k", 1, MATERIAL))


def test_version_material_does_not_unwrap_under_another_root_key() -> None:
    blob = root_key().wrap_version_material("tenant-a", 1, MATERIAL)
    # The blob names its root key, so another key refuses it by that id.
    with pytest.raises(crypto.RootKeyMissing):
        root_key().unwrap_version_material("tenant-a", 1, blob)


def test_data_key_round_trips_for_its_own_backup() -> None:
    data_key = os.urandom(32)
    blob = crypto.wrap_data_key(MATERIAL, "backup-1", "tenant-a", 2, data_key)
    assert crypto.unwrap_data_key(MATERIAL, "backup-1", "tenant-a", 2, blob) == data_key
    assert data_key not in blob


@pytest.mark.parametrize(
    ("backup_id", "key_name", "version", "material"),
    [
        ("backup-2", "tenant-a", 2, MATERIAL),
        ("backup-1", "tenant-b", 2, MATERIAL),
        ("backup-1", "tenant-a", 1, MATERIAL),
        ("backup-1", "tenant-a", 2, bytes(32)),
    ],
    ids=["other-backup", "other-key", "other-version", "other-material"],
)
def test_data_key_does_not_unwrap_for_anything_else(
    backup_id: str, key_name: str, version: int, material: bytes
) -> None:
    blob = crypto.wrap_data_key(MATERIAL, "backup-1", "tenant-a", 2, os.urandom(32))
    with pytest.raises(IntegrityFailure) as caught:
        crypto.unwrap_data_key(material, backup_id, key_name, version, blob)
    assert caught.value.reason == "WRAPPED_BLOB_INTEGRITY"


def test_a_data_key_blob_is_not_a_version_blob() -> None:
    """Purposes are separated: a blob of one kind never unwraps as the other."""
    root_material = os.urandom(32)
    root = crypto.RootKey(root_material)
    blob = crypto.wrap_data_key(root_material, "1", "k", 1, MATERIAL)
    with pytest.raises(IntegrityFailure):
        root.unwrap_version_material("k", 1, blob)


@pytest.mark.parametrize("position", [0, 1, 12, 13, -1])
def test_any_flipped_byte_fails(position: int) -> None:
    blob = bytearray(crypto.wrap_data_key(MATERIAL, "b", "k", 1, os.urandom(32)))
    blob[position] ^= 0x80
    with pytest.raises(IntegrityFailure):
        crypto.unwrap_data_key(MATERIAL, "b", "k", 1, bytes(blob))


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x01" + bytes(27), b"\x02" + bytes(60)])
def test_short_or_unknown_format_blobs_are_malformed(blob: bytes) -> None:
    with pytest.raises(IntegrityFailure) as caught:
        crypto.unwrap_data_key(MATERIAL, "b", "k", 1, blob)
    assert caught.value.reason == "WRAPPED_BLOB_MALFORMED"


def test_wrapping_twice_gives_different_blobs() -> None:
    data_key = os.urandom(32)
    first = crypto.wrap_data_key(MATERIAL, "b", "k", 1, data_key)
    assert first != crypto.wrap_data_key(MATERIAL, "b", "k", 1, data_key)


def test_root_key_check_value_recognises_only_its_root_key() -> None:
    root = root_key()
    check = root.check_value()
    assert root.matches(check)
    assert not root_key().matches(check)
    assert not root.matches(b"garbage")


def test_root_key_repr_hides_the_material() -> None:
    material = bytes(range(100, 132))
    shown = repr(crypto.RootKey(material))
    assert material.hex() not in shown and repr(material) not in shown


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_root_key_must_be_32_bytes(size: int) -> None:
    with pytest.raises(crypto.RootKeyError):
        crypto.RootKey(b"x" * size)


def test_created_root_key_file_is_private_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    crypto.RootKey.create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32
    crypto.RootKey.load(path)


def test_create_never_overwrites_a_root_key(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    crypto.RootKey.create(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        crypto.RootKey.create(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o610, 0o601, 0o666])
def test_a_root_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "root.key"
    crypto.RootKey.create(path)
    path.chmod(mode)
    with pytest.raises(crypto.RootKeyError, match="chmod 600"):
        crypto.RootKey.load(path)


def test_a_missing_root_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(crypto.RootKeyError, match="cannot read"):
        crypto.RootKey.load(tmp_path / "missing.key")


def test_new_key_material_is_32_random_bytes() -> None:
    values = {crypto.new_key_material() for _ in range(10)}
    assert len(values) == 10
    assert all(len(v) == 32 for v in values)


def test_random_bytes_never_hands_out_the_same_bytes_twice() -> None:
    # Enough takes to cross several of the pool's blocks, including takes that straddle one.
    sizes = [12, 32, 16, 7] * 600
    taken = [crypto.random_bytes(size) for size in sizes]
    assert [len(value) for value in taken] == sizes
    whole = [value for value in taken if len(value) >= 12]
    assert len(set(whole)) == len(whole)


def test_random_bytes_larger_than_a_block_come_straight_from_the_kernel() -> None:
    big = crypto.random_bytes(10_000)
    assert len(big) == 10_000 and big != bytes(10_000)


def test_a_forked_child_does_not_reuse_its_parents_random_bytes() -> None:
    crypto.random_bytes(1)  # the parent holds a partly used block
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send what it would hand out next, then leave at once
        os.write(writer, crypto.random_bytes(32))
        os._exit(0)
    os.close(writer)
    child = os.read(reader, 32)
    os.close(reader)
    os.waitpid(pid, 0)
    assert crypto.random_bytes(32) != child
