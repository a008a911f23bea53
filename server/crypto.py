"""Envelope encryption: the root key wraps version material, version material wraps data keys.

Every blob is `format byte || 12-byte random nonce || AES-256-GCM ciphertext+tag`,
and its associated data names exactly what the blob belongs to, so a blob
copied onto another row, key, version or backup fails to unwrap.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.domain.errors import IntegrityFailure
from server.domain.model import KEY_MATERIAL_BYTES

BLOB_FORMAT = b"\x01"
NONCE_BYTES = 12
TAG_BYTES = 16
_ROOT_CHECK_AAD = b"kms.v1/root-key-check"


class RootKeyError(Exception):
    """The root key file is missing, malformed or does not match the database."""


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


def _open_into_buffer(
    key: bytes | bytearray, blob: bytes, associated_data: bytes, what: str
) -> bytearray:
    """As `_open`, but decrypts straight into a bytearray the caller can wipe: no `bytes`
    copy of the plaintext is ever made."""
    nonce, sealed = _split(blob, what)
    plaintext = bytearray(len(sealed) - TAG_BYTES)
    try:
        AESGCM(key).decrypt_into(nonce, sealed, associated_data, plaintext)
    except InvalidTag:
        raise IntegrityFailure(
            "WRAPPED_BLOB_INTEGRITY", f"{what} failed its integrity check"
        ) from None
    return plaintext


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
    """The key-encryption key that lives outside the database."""

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_MATERIAL_BYTES:
            raise RootKeyError(f"a root key is {KEY_MATERIAL_BYTES} bytes, not {len(material)}")
        self._material = material

    def __repr__(self) -> str:
        return "RootKey(<hidden>)"

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
        return cls(material)

    @staticmethod
    def create(path: Path) -> None:
        """Writes a new random root key, readable by its owner only; never overwrites."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(new_key_material())

    def check_value(self) -> bytes:
        """A value stored in the database at its first start to recognise this root key."""
        return _seal(self._material, b"", _ROOT_CHECK_AAD)

    def matches(self, check_value: bytes) -> bool:
        try:
            _open(self._material, check_value, _ROOT_CHECK_AAD, "root key check value")
        except IntegrityFailure:
            return False
        return True

    def wrap_version_material(
        self, key_name: str, version: int, material: bytes | bytearray
    ) -> bytes:
        return _seal(self._material, material, _associated_data("version", key_name, version))

    def unwrap_version_material(self, key_name: str, version: int, blob: bytes) -> bytearray:
        """Into a bytearray, so the material cache can wipe it when it lets it go."""
        return _open_into_buffer(
            self._material,
            blob,
            _associated_data("version", key_name, version),
            f"the wrapped material of {key_name} version {version}",
        )

    def wrap_server_secret(self, name: str, secret: bytes | bytearray) -> bytes:
        """A server secret (audit MAC key, signing key, state key), bound to its name."""
        return _seal(self._material, secret, _associated_data("server-secret", name))

    def unwrap_server_secret(self, name: str, blob: bytes) -> bytearray:
        return _open_into_buffer(
            self._material, blob, _associated_data("server-secret", name), f"server secret {name}"
        )


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
