"""Envelope encryption: a root key wraps version material, version material wraps data keys.

A blob under version material is `0x01 || 12-byte random nonce || AES-256-GCM ciphertext+tag`.
A blob under a root key is `0x02 || 8-byte root key id || nonce || ciphertext+tag`, so the
keyring knows which root key opens it; format-1 blobs under a root key, written before key
ids existed, belong to the one root key whose format-1 check value is in server_meta.
Associated data names exactly what the blob belongs to (and, in format 2, its header), so a
blob copied onto another row, key, version or backup fails to unwrap.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.domain.errors import FailedPrecondition, IntegrityFailure
from server.domain.model import KEY_MATERIAL_BYTES

BLOB_FORMAT = b"\x01"
ROOT_BLOB_FORMAT = b"\x02"
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
_ROOT_CHECK_AAD = b"kms.v1/root-key-check"


class RootKeyError(Exception):
    """A root key is missing, malformed, unusable or does not match the database."""


class RootKeyMissing(FailedPrecondition):
    """A blob is wrapped under a root key this server was not given: that one call fails."""

    def __init__(self, key_id: str, what: str) -> None:
        super().__init__(
            "ROOT_KEY_MISSING",
            f"{what} is wrapped under root key {key_id}, which this server was not given "
            "(add it with --previous-root-key-file)",
        )
        self.key_id = key_id


def _associated_data(purpose: str, *parts: str | int) -> bytes:
    """Length-prefixed, so no two different part lists encode alike."""
    out = bytearray(b"kms.v1/" + purpose.encode())
    for part in parts:
        encoded = str(part).encode()
        out += struct.pack(">I", len(encoded)) + encoded
    return bytes(out)


class _RandomBytes:
    """The kernel's CSPRNG output, read a block at a time and handed out in slices, never twice.

    `os.urandom` releases the GIL on every call. In the server, where many threads want
    the GIL, getting it back costs tens of microseconds each time, and a data key took
    three such calls (key, nonce, request id). One read per BLOCK bytes costs one.
    """

    BLOCK = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._block = b""
        self._used = 0

    def take(self, count: int) -> bytes:
        if count > self.BLOCK:
            return os.urandom(count)
        with self._lock:
            if self._used + count > len(self._block):
                self._block, self._used = os.urandom(self.BLOCK), 0
            start = self._used
            self._used += count
            return self._block[start : self._used]

    def forget(self) -> None:
        """Drops what is left: a forked child must not hand out its parent's bytes again."""
        self._lock = threading.Lock()
        self._block, self._used = b"", 0


_RANDOM = _RandomBytes()
os.register_at_fork(after_in_child=_RANDOM.forget)


def random_bytes(count: int) -> bytes:
    """`count` bytes from the kernel's CSPRNG, as `os.urandom` gives (see _RandomBytes)."""
    return _RANDOM.take(count)


def _seal(key: bytes | bytearray, plaintext: bytes | bytearray, associated_data: bytes) -> bytes:
    nonce = random_bytes(NONCE_BYTES)
    return BLOB_FORMAT + nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def _open(key: bytes | bytearray, blob: bytes, associated_data: bytes, what: str) -> bytes:
    nonce, sealed = _split(blob, what)
    try:
        return AESGCM(key).decrypt(nonce, sealed, associated_data)
    except InvalidTag:
        raise IntegrityFailure(
            "WRAPPED_BLOB_INTEGRITY", f"{what} failed its integrity check"
        ) from None


def _split(blob: bytes, what: str) -> tuple[bytes, bytes]:
    if len(blob) < 1 + NONCE_BYTES + TAG_BYTES or blob[:1] != BLOB_FORMAT:
        raise IntegrityFailure("WRAPPED_BLOB_MALFORMED", f"{what} is malformed")
    return blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]


def new_key_material() -> bytes:
    return random_bytes(KEY_MATERIAL_BYTES)


def new_secret_buffer() -> bytearray:
    """32 fresh bytes read straight into a buffer the caller owns and can zero (`wipe`).

    Not from the pooled block of `random_bytes`: that block would keep a copy of the
    secret in memory until it is used up.
    """
    buffer = bytearray(KEY_MATERIAL_BYTES)
    with open("/dev/urandom", "rb", buffering=0) as source:
        if source.readinto(buffer) != KEY_MATERIAL_BYTES:
            raise OSError("short read from /dev/urandom")
    return buffer


def wipe(buffer: bytearray) -> None:
    """Overwrites a secret in place (a bytearray is the one buffer Python lets us clear)."""
    buffer[:] = bytes(len(buffer))


class RootKey:
    """A key-encryption key that lives outside the database: a file (this class) or an HSM
    object (`server.keystore.pkcs11_root.Pkcs11RootKey`). Subclasses provide `key_id`, `describe`,
    `_encrypt` and `_decrypt`; the blob format and associated data are the same for all."""

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_MATERIAL_BYTES:
            raise RootKeyError(f"a root key is {KEY_MATERIAL_BYTES} bytes, not {len(material)}")
        self._material = material
        # One-way: names the key without revealing anything about it.
        self._id = hmac.digest(material, b"kms.v1/root-key-id", hashlib.sha256)[:KEY_ID_BYTES]
        self.source = "a root key file"

    def __repr__(self) -> str:
        return f"RootKey({self.key_id}, <hidden>)"

    @property
    def key_id_bytes(self) -> bytes:
        return self._id

    @property
    def key_id(self) -> str:
        return self.key_id_bytes.hex()

    def describe(self) -> str:
        return f"root key {self.key_id} ({self.source})"

    @classmethod
    def load(cls, path: Path) -> RootKey:
        try:
            mode = path.stat().st_mode
            material = path.read_bytes()
        except OSError as error:
            raise RootKeyError(f"cannot read root key file {path}: {error.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise RootKeyError(f"root key file {path} is readable by others; run: chmod 600 {path}")
        if len(material) != KEY_MATERIAL_BYTES:
            raise RootKeyError(
                f"root key file {path} must hold exactly {KEY_MATERIAL_BYTES} raw bytes"
            )
        key = cls(material)
        key.source = f"file {path}"
        return key

    @staticmethod
    def create(path: Path) -> None:
        """Writes a new random root key, readable by its owner only; never overwrites."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(new_key_material())

    # What a backend does: AES-256-GCM with a 128-bit tag, here or inside an HSM.

    def _encrypt(self, nonce: bytes, plaintext: bytes | bytearray, associated_data: bytes) -> bytes:
        return AESGCM(self._material).encrypt(nonce, plaintext, associated_data)

    def _decrypt(self, nonce: bytes, sealed: bytes, associated_data: bytes, what: str) -> bytearray:
        plaintext = bytearray(len(sealed) - TAG_BYTES)
        try:
            AESGCM(self._material).decrypt_into(nonce, sealed, associated_data, plaintext)
        except InvalidTag:
            raise IntegrityFailure(
                "WRAPPED_BLOB_INTEGRITY", f"{what} failed its integrity check"
            ) from None
        return plaintext

    # The blob format, shared by every backend.

    def _seal_root(self, plaintext: bytes | bytearray, associated_data: bytes) -> bytes:
        header = ROOT_BLOB_FORMAT + self.key_id_bytes
        nonce = random_bytes(NONCE_BYTES)
        return header + nonce + self._encrypt(nonce, plaintext, header + associated_data)

    def _open_root(self, blob: bytes, associated_data: bytes, what: str) -> bytearray:
        """Opens a format-2 blob under this key, or a format-1 blob (written before key ids)."""
        if blob[:1] == BLOB_FORMAT:
            nonce, sealed = _split(blob, what)
            return self._decrypt(nonce, sealed, associated_data, what)
        header = blob[: 1 + KEY_ID_BYTES]
        if len(blob) < len(header) + NONCE_BYTES + TAG_BYTES or header[:1] != ROOT_BLOB_FORMAT:
            raise IntegrityFailure("WRAPPED_BLOB_MALFORMED", f"{what} is malformed")
        if header[1:] != self.key_id_bytes:
            raise RootKeyMissing(header[1:].hex(), what)
        body = blob[len(header) :]
        return self._decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], header + associated_data, what)

    def check_value(self) -> bytes:
        """A value stored in the database to recognise this root key."""
        return self._seal_root(b"", _ROOT_CHECK_AAD)

    def matches(self, check_value: bytes) -> bool:
        try:
            self._open_root(check_value, _ROOT_CHECK_AAD, "root key check value")
        except (IntegrityFailure, FailedPrecondition):
            return False
        return True

    def wrap_version_material(
        self, key_name: str, version: int, material: bytes | bytearray
    ) -> bytes:
        return self._seal_root(material, _associated_data("version", key_name, version))

    def unwrap_version_material(self, key_name: str, version: int, blob: bytes) -> bytearray:
        """Into a bytearray, so the material cache can wipe it when it lets it go."""
        return self._open_root(
            blob,
            _associated_data("version", key_name, version),
            f"the wrapped material of {key_name} version {version}",
        )

    def wrap_server_secret(self, name: str, secret: bytes | bytearray) -> bytes:
        """A server secret (audit MAC key, signing key, state key), bound to its name."""
        return self._seal_root(secret, _associated_data("server-secret", name))

    def unwrap_server_secret(self, name: str, blob: bytes) -> bytearray:
        return self._open_root(
            blob, _associated_data("server-secret", name), f"server secret {name}"
        )


def root_key_id_of(blob: bytes) -> str | None:
    """The id of the root key a format-2 blob names; None for a format-1 blob."""
    if blob[:1] == ROOT_BLOB_FORMAT and len(blob) > KEY_ID_BYTES:
        return blob[1 : 1 + KEY_ID_BYTES].hex()
    return None


class RootKeyring:
    """The root keys a server holds: the current one wraps every new blob; the previous ones
    only unwrap, during a rotation (`kms-server rewrap-root-keys`). Each blob names its key."""

    def __init__(self, current: RootKey, previous: Sequence[RootKey] = ()) -> None:
        self.current = current
        self._by_id: dict[str, RootKey] = {}
        for key in (current, *previous):
            if key.key_id in self._by_id:
                raise RootKeyError(f"{key.describe()} is given twice")
            self._by_id[key.key_id] = key
        # The key format-1 blobs belong to, once its format-1 check value has matched it.
        self.legacy: RootKey | None = None
        self.legacy_id: str | None = None  # known from server_meta even when the key is absent

    def __repr__(self) -> str:
        return f"RootKeyring(current={self.current.key_id}, ids={sorted(self._by_id)})"

    @property
    def keys(self) -> list[RootKey]:
        return list(self._by_id.values())

    def get(self, key_id: str) -> RootKey | None:
        return self._by_id.get(key_id)

    def key_for(self, blob: bytes, what: str) -> RootKey:
        """The key that opens `blob`, or RootKeyMissing naming the one it needs."""
        key_id = root_key_id_of(blob)
        header = 1 if key_id is None else 1 + KEY_ID_BYTES
        if len(blob) < header + NONCE_BYTES + TAG_BYTES or blob[:1] not in (
            BLOB_FORMAT,
            ROOT_BLOB_FORMAT,
        ):
            raise IntegrityFailure("WRAPPED_BLOB_MALFORMED", f"{what} is malformed")
        if key_id is None:
            if self.legacy is None:
                raise RootKeyMissing(
                    self.legacy_id or "that initialised this database (before key ids)", what
                )
            return self.legacy
        key = self._by_id.get(key_id)
        if key is None:
            raise RootKeyMissing(key_id, what)
        return key

    def is_current(self, blob: bytes) -> bool:
        return root_key_id_of(blob) == self.current.key_id

    def check_value(self) -> bytes:
        return self.current.check_value()

    def wrap_version_material(
        self, key_name: str, version: int, material: bytes | bytearray
    ) -> bytes:
        return self.current.wrap_version_material(key_name, version, material)

    def unwrap_version_material(self, key_name: str, version: int, blob: bytes) -> bytearray:
        what = f"the wrapped material of {key_name} version {version}"
        return self.key_for(blob, what).unwrap_version_material(key_name, version, blob)

    def wrap_server_secret(self, name: str, secret: bytes | bytearray) -> bytes:
        return self.current.wrap_server_secret(name, secret)

    def unwrap_server_secret(self, name: str, blob: bytes) -> bytearray:
        return self.key_for(blob, f"server secret {name}").unwrap_server_secret(name, blob)


def as_keyring(key: RootKey | RootKeyring) -> RootKeyring:
    return key if isinstance(key, RootKeyring) else RootKeyring(key)


def wrap_data_key(
    version_material: bytes | bytearray,
    backup_id: str,
    key_name: str,
    version: int,
    data_key: bytes,
) -> bytes:
    return _seal(
        version_material, data_key, _associated_data("data-key", backup_id, key_name, version)
    )


def unwrap_data_key(
    version_material: bytes | bytearray, backup_id: str, key_name: str, version: int, blob: bytes
) -> bytes:
    return _open(
        version_material,
        blob,
        _associated_data("data-key", backup_id, key_name, version),
        f"the wrapped data key of backup {backup_id}",
    )
