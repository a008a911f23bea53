"""A root key inside a real SoftHSM2 token (PKCS#11): the server wraps and unwraps in the token
with a sensitive, non-extractable key; each start-up failure is named; rotation moves blobs
from a file key to the HSM key and back while data-key calls keep succeeding."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from server.domain.errors import IntegrityFailure, Unavailable
from server.keystore import crypto
from server.keystore.pkcs11_root import Pkcs11RootKey
from tests.conftest import RunningKms, start_kms
from tests.integration.kms_helpers import (
    expect_error,
    issue,
    message_of,
    register,
    resolve,
    rotate,
    verify,
)
from tests.integration.root_key_support import (
    DataKeyLoad,
    check_value_names,
    key_id,
    new_root_key_file,
    rewrap,
    root_key_ids_of_blobs,
)
from tests.softhsm import KEY_LABEL, SoftHsm, hsm_fixture  # noqa: F401


def _open(hsm: SoftHsm, label: str = KEY_LABEL) -> Pkcs11RootKey:
    return Pkcs11RootKey.open(hsm.uri(label), Path(hsm.module), hsm.pin_file.read_text().strip())


def test_the_root_key_stays_in_the_token_and_deleting_it_makes_the_next_unwrap_fail(
    hsm: SoftHsm,
) -> None:
    # The key the whole test runs on was generated in the token, sensitive and not extractable.
    assert hsm.key_attribute("SENSITIVE") is True
    assert hsm.key_attribute("EXTRACTABLE") is False
    from pkcs11 import AttributeSensitive

    with pytest.raises(AttributeSensitive):
        hsm.key_attribute("VALUE")
    root = _open(hsm)
    blob = root.wrap_version_material("tenant-a", 1, b"m" * 32)
    assert crypto.root_key_id_of(blob) == root.key_id
    assert root.unwrap_version_material("tenant-a", 1, blob) == b"m" * 32
    # Bound to what it belongs to, like a file key's blob.
    with pytest.raises(IntegrityFailure):
        root.unwrap_version_material("tenant-a", 2, blob)
    # Another key (a file key) is refused by id, not tried.
    with pytest.raises(crypto.RootKeyMissing, match=root.key_id):
        crypto.RootKey(crypto.new_key_material()).unwrap_version_material("tenant-a", 1, blob)
    hsm.delete_key()
    # No copy of the key in this process: the token's object is gone, so unwrapping fails.
    with pytest.raises(Unavailable, match=f"root key {root.key_id}"):
        root.unwrap_version_material("tenant-a", 1, blob)
    root.close()


def test_a_server_on_an_hsm_root_key_serves_and_fails_closed_once_the_key_is_deleted(
    tmp_path: Path, hsm: SoftHsm
) -> None:
    kms = start_kms(tmp_path / "kms", **hsm.server_flags(), material_cache_seconds="0")
    try:
        assert not (tmp_path / "kms" / "root.key").exists(), "dev mode made a file key anyway"
        register(kms.stub("admin"), "tenant-a", activate=True)
        issued = issue(kms.stub("backup"), "b1", "tenant-a").data_key
        assert resolve(kms.stub("restore"), "b1").data_key == issued
        assert verify(kms).intact
        (hsm_id,) = root_key_ids_of_blobs(kms)
        assert check_value_names(kms) == [f"root_key_check/{hsm_id}"]
        hsm.delete_key()
        # Nothing cached (0 s): the next call unwraps in the token, which no longer has the key.
        error = expect_error(
            lambda: resolve(kms.stub("restore"), "b1"),
            grpc.StatusCode.UNAVAILABLE,
            "ROOT_KEY_UNAVAILABLE",
        )
        assert hsm_id in message_of(error)
        assert issued.hex() not in message_of(error)
    finally:
        kms.close()


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("wrong PIN", "wrong PIN for token"),
        ("missing token", "has no token labelled 'no-such-token'"),
        ("missing object", "holds no AES secret key labelled 'no-such-key'"),
        ("key that may not encrypt", "may not wrap: it may not encrypt"),
        ("extractable key", "may not wrap: it is extractable"),
        ("module that does not exist", "cannot load the PKCS#11 module"),
        ("module that is not a library", "cannot load the PKCS#11 module"),
        ("no PIN", "give the token's PIN"),
    ],
)
def test_each_start_up_failure_of_an_hsm_root_key_is_named(
    tmp_path: Path, hsm: SoftHsm, problem: str, expected: str
) -> None:
    flags = hsm.server_flags()
    if problem == "wrong PIN":
        wrong = tmp_path / "wrong-pin"
        wrong.write_text("0000")
        flags["pkcs11_pin_file"] = str(wrong)
    elif problem == "missing token":
        flags["root_key"] = hsm.uri(token="no-such-token")
    elif problem == "missing object":
        flags["root_key"] = hsm.uri("no-such-key")
    elif problem == "key that may not encrypt":
        hsm.make_key("no-encrypt", encrypt=False)
        flags["root_key"] = hsm.uri("no-encrypt")
    elif problem == "extractable key":
        hsm.make_key("extractable", extractable=True)
        flags["root_key"] = hsm.uri("extractable")
    elif problem == "module that does not exist":
        flags["pkcs11_module"] = str(tmp_path / "missing.so")
    elif problem == "module that is not a library":
        (tmp_path / "text.so").write_text("not a shared object")
        flags["pkcs11_module"] = str(tmp_path / "text.so")
    elif problem == "no PIN":
        del flags["pkcs11_pin_file"]
    with pytest.raises(crypto.RootKeyError, match=expected) as caught:
        start_kms(tmp_path / "kms", **flags)
    assert hsm.pin_file.read_text().strip() not in str(caught.value)


def _seed(kms: RunningKms) -> dict[str, bytes]:
    admin, backup = kms.stub("admin"), kms.stub("backup")
    issued: dict[str, bytes] = {}
    for name in ("tenant-a", "tenant-b"):
        register(admin, name, activate=True)
        issued[f"{name}-v1"] = issue(backup, f"{name}-v1", name).data_key
        register(admin, name)
        rotate(admin, 2, name, reason="seed")
        issued[f"{name}-v2"] = issue(backup, f"{name}-v2", name).data_key
    return issued


def _rotate_under_load(
    kms: RunningKms, issued: dict[str, bytes], flags: list[str], env: dict[str, str]
) -> None:
    load = DataKeyLoad([kms], issued, "tenant-a").start()
    try:
        time.sleep(0.5)
        rewrap(kms, flags, batch_size=1, env=env)
        time.sleep(1.5)  # past the cache's bound: unwrapped again under the new key
    finally:
        load.stop()
    assert not load.failures, load.failures[:5]
    assert load.calls > 10


def test_rotation_from_a_file_key_to_the_hsm_and_back_under_load(
    tmp_path: Path, database_url: str, hsm: SoftHsm
) -> None:
    data_dir = tmp_path / "kms"
    kms = start_kms(data_dir, database_url, material_cache_seconds="1")
    file_key = kms.settings.root_key_file
    uri = hsm.uri()
    try:
        issued = _seed(kms)
        # File -> HSM: the HSM key current, the file key previous.
        kms.close()
        kms = start_kms(data_dir, database_url, material_cache_seconds="1",
                        previous_root_key_file=str(file_key), **hsm.server_flags())  # fmt: skip
        _rotate_under_load(
            kms,
            issued,
            ["--root-key", uri, *hsm.cli_flags(), "--previous-root-key-file", str(file_key)],
            {},
        )
        (hsm_id,) = root_key_ids_of_blobs(kms)
        assert hsm_id != key_id(file_key)
        kms.close()
        kms = start_kms(data_dir, database_url, **hsm.server_flags())  # the HSM key alone
        for backup_id, data_key in issued.items():
            assert resolve(kms.stub("restore"), backup_id).data_key == data_key
        assert verify(kms).intact, verify(kms).problem
        # HSM -> a new file key: the HSM key previous.
        new_file = new_root_key_file(tmp_path / "new.key")
        kms.close()
        kms = start_kms(data_dir, database_url, material_cache_seconds="1",
                        root_key_file=str(new_file), previous_root_key_file=uri,
                        pkcs11_module=hsm.module, pkcs11_pin_file=str(hsm.pin_file))  # fmt: skip
        _rotate_under_load(
            kms,
            issued,
            ["--root-key-file", str(new_file), "--previous-root-key-file", uri, *hsm.cli_flags()],
            {},
        )
        assert root_key_ids_of_blobs(kms) == {key_id(new_file): 4 + 3}
        kms.close()
        kms = start_kms(data_dir, database_url, root_key_file=str(new_file))
        for backup_id, data_key in issued.items():
            assert resolve(kms.stub("restore"), backup_id).data_key == data_key
        assert verify(kms).intact, verify(kms).problem
    finally:
        kms.close()
