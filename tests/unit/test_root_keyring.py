"""The keyring of root keys and the PKCS#11 URI syntax (RFC 7512), without a token."""

from __future__ import annotations

import pytest

from server.domain.errors import IntegrityFailure
from server.keystore import crypto
from server.keystore.pkcs11_root import parse_uri

MATERIAL = b"v" * 32


def _key() -> crypto.RootKey:
    return crypto.RootKey(crypto.new_key_material())


def test_the_current_key_wraps_and_every_key_of_the_ring_unwraps_its_own_blobs() -> None:
    old, new = _key(), _key()
    blob = old.wrap_version_material("k", 1, MATERIAL)
    ring = crypto.RootKeyring(new, [old])
    assert ring.unwrap_version_material("k", 1, blob) == MATERIAL
    rewrapped = ring.wrap_version_material("k", 1, MATERIAL)
    assert crypto.root_key_id_of(rewrapped) == new.key_id and ring.is_current(rewrapped)
    assert not ring.is_current(blob)
    with pytest.raises(crypto.RootKeyMissing, match=new.key_id):
        crypto.RootKeyring(old).unwrap_version_material("k", 1, rewrapped)


def test_a_format_1_blob_belongs_to_the_legacy_key_and_is_refused_without_it() -> None:
    old = _key()
    nonce = crypto.random_bytes(crypto.NONCE_BYTES)
    # What the code before key ids wrote: format byte, nonce, ciphertext, under the same AAD.
    legacy_blob = (
        crypto.BLOB_FORMAT
        + nonce
        + old._encrypt(nonce, MATERIAL, crypto._associated_data("version", "k", 1))
    )
    ring = crypto.RootKeyring(_key(), [old])
    ring.legacy_id = old.key_id
    with pytest.raises(crypto.RootKeyMissing, match=old.key_id):
        ring.unwrap_version_material("k", 1, legacy_blob)
    ring.legacy = old
    assert ring.unwrap_version_material("k", 1, legacy_blob) == MATERIAL


def test_a_key_given_twice_is_refused_and_ids_reveal_nothing_of_the_key() -> None:
    key = _key()
    with pytest.raises(crypto.RootKeyError, match="given twice"):
        crypto.RootKeyring(key, [crypto.RootKey(key._material)])
    assert key._material.hex()[:16] not in key.key_id
    assert len(key.key_id) == 16 and key.key_id in repr(key)


def test_the_format_2_header_is_bound_by_the_associated_data() -> None:
    key = _key()
    blob = bytearray(key.wrap_server_secret("s", MATERIAL))
    blob[0] = 0x01  # claims format 1: the tag no longer verifies
    with pytest.raises(IntegrityFailure):
        key.unwrap_server_secret("s", bytes(blob))


def test_pkcs11_uris_are_parsed_as_rfc_7512_says() -> None:
    uri = parse_uri("pkcs11:token=My%20HSM;object=kms-root;id=%01%ff;type=secret-key"
                    "?module-path=/usr/lib/x.so&pin-source=file:/etc/pin")  # fmt: skip
    assert (uri.token, uri.object, uri.id) == ("My HSM", "kms-root", b"\x01\xff")
    assert (uri.module_path, uri.pin_source) == ("/usr/lib/x.so", "file:/etc/pin")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("token=a;object=b", "is a pkcs11: URI"),
        ("pkcs11:object=b", "must name the key's token"),
        ("pkcs11:token=a", "must name the key's object"),
        ("pkcs11:token=a;object=b;serial=1", "unknown or malformed attribute 'serial'"),
        ("pkcs11:token=a;object=b;type=private", "a secret-key, not private"),
        ("pkcs11:token=a;token=c;object=b", "token is given twice"),
        ("pkcs11:token=a;object=b?pin-value=1234", "unknown or malformed attribute 'pin-value'"),
    ],
)
def test_a_pkcs11_uri_that_is_not_understood_is_refused_naming_why(text: str, message: str) -> None:
    with pytest.raises(crypto.RootKeyError, match=message):
        parse_uri(text)
