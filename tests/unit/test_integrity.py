"""State MACs and the material cache's wiping, without a database."""

from __future__ import annotations

import dataclasses
import time

import pytest

from server.domain.errors import IntegrityFailure
from server.domain.integrity import SealedKey, SealedVersion, StateSeal
from server.keystore.material_cache import MaterialCache

SEAL = StateSeal(b"s" * 32)
KEY = SealedKey("tenant-a", 2, 3, 1_700_000_000, 41)
VERSION = SealedVersion("tenant-a", 2, "enabled", "generated", True, 1_700_000_000, None, 41)


def test_a_sealed_row_checks_and_every_field_is_covered() -> None:
    SEAL.check(KEY, SEAL.key_mac(KEY))
    SEAL.check(VERSION, SEAL.version_mac(VERSION))
    for row, mac in ((KEY, SEAL.key_mac(KEY)), (VERSION, SEAL.version_mac(VERSION))):
        for field in dataclasses.fields(row):
            value = getattr(row, field.name)
            if isinstance(value, bool):
                changed: object = not value
            elif isinstance(value, int) or value is None:
                changed = (value or 0) + 1
            else:
                changed = value + "x"
            edited = dataclasses.replace(row, **{field.name: changed})  # type: ignore[arg-type]
            with pytest.raises(IntegrityFailure, match="failed its integrity check"):
                StateSeal(b"s" * 32).check(edited, mac)


def test_a_missing_mac_or_another_key_fails() -> None:
    with pytest.raises(IntegrityFailure) as missing:
        SEAL.check(KEY, None)
    assert missing.value.reason == "STATE_INTEGRITY"
    with pytest.raises(IntegrityFailure):
        StateSeal(b"t" * 32).check(KEY, SEAL.key_mac(KEY))


def test_none_and_zero_are_different_values() -> None:
    """A key with no active version must not share a MAC with one whose active version is 0."""
    none = dataclasses.replace(KEY, active_version=None)
    zero = dataclasses.replace(KEY, active_version=0)
    assert SEAL.key_mac(none) != SEAL.key_mac(zero)


def test_a_count_of_wrapped_data_keys_is_covered_once_there_is_one() -> None:
    """Rows sealed before versions counted keep their MACs; a count, with or without a
    scheduled destruction, gives a MAC of its own."""
    assert dataclasses.replace(VERSION, data_keys_wrapped=0) == VERSION
    counted = dataclasses.replace(VERSION, data_keys_wrapped=7)
    scheduled = dataclasses.replace(counted, destroy_due_us=5, destroy_requested_by="admin")
    macs = {SEAL.version_mac(row) for row in (VERSION, counted, scheduled)}
    assert len(macs) == 3
    SEAL.check(counted, SEAL.seal(counted))  # what the server writes, it reads back


def test_a_valid_pair_is_remembered_but_never_a_different_row_under_the_same_mac() -> None:
    seal = StateSeal(b"s" * 32)
    mac = seal.key_mac(KEY)
    seal.check(KEY, mac)
    with pytest.raises(IntegrityFailure):
        seal.check(dataclasses.replace(KEY, active_version=1), mac)


def test_evicted_material_is_wiped_at_the_next_sweep_not_before() -> None:
    cache = MaterialCache(60)
    material = bytearray(b"m" * 32)
    cache.put("k", 1, b"blob", material)
    assert cache.get("k", 1, b"blob") is material
    assert cache.get("k", 1, b"another blob") is None  # re-registered or tampered: unwrap again
    cache.evict("k", 1)
    assert cache.get("k", 1, b"blob") is None
    assert material == bytearray(b"m" * 32)  # a call that just took it may still be using it
    cache.sweep()
    assert material == bytearray(32)


def test_expired_material_leaves_and_is_wiped_one_sweep_later() -> None:
    cache = MaterialCache(0.05)
    material = bytearray(b"m" * 32)
    cache.put("k", 1, b"blob", material)
    time.sleep(0.1)
    assert cache.get("k", 1, b"blob") is None
    cache.sweep()  # lets it go
    cache.sweep()  # wipes it
    assert material == bytearray(32)


def test_close_wipes_everything() -> None:
    cache = MaterialCache(60)
    cache.start_sweeping()
    buffers = [bytearray(b"m" * 32) for _ in range(3)]
    for version, material in enumerate(buffers, start=1):
        cache.put("k", version, b"blob", material)
    cache.close()
    assert all(material == bytearray(32) for material in buffers)
