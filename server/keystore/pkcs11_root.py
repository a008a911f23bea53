"""A root key held in an HSM, used through PKCS#11 (python-pkcs11).

The key is an AES-256 secret key object, sensitive and non-extractable: AES-GCM runs inside
the token (CKM_AES_GCM), so the root key never enters this process. The blob format is the
file key's (server.keystore.crypto), so the keyring treats an HSM key like any other entry, and a
rotation moves blobs from a file key to an HSM key or back.

Named by an RFC 7512 URI: `pkcs11:token=LABEL;object=LABEL`, optionally `;id=%01%02` and
`;type=secret-key`, and the query attributes `module-path=` and `pin-source=file:...`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from server.domain.errors import IntegrityFailure, Unavailable
from server.keystore.crypto import KEY_ID_BYTES, TAG_BYTES, RootKey, RootKeyError

if TYPE_CHECKING:
    from server.config import ServerSettings

PIN_VARIABLE = "KMS_PKCS11_PIN"
_PATH_ATTRIBUTES = {"token", "object", "id", "type"}
_QUERY_ATTRIBUTES = {"module-path", "pin-source"}


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str
    object: str
    id: bytes | None = None
    module_path: str | None = None
    pin_source: str | None = None

    def __str__(self) -> str:
        return f"pkcs11:token={self.token};object={self.object}"


def parse_uri(uri: str) -> Pkcs11Uri:
    """RFC 7512: `pkcs11:` path attributes separated by `;`, query attributes by `&`,
    values percent-encoded. An attribute this server does not know is refused, not ignored."""
    if not uri.startswith("pkcs11:"):
        raise RootKeyError(f"a PKCS#11 root key is a pkcs11: URI, not {uri!r}")
    path, _, query = uri[len("pkcs11:") :].partition("?")
    values: dict[str, str] = {}
    raw_id: bytes | None = None
    for part, allowed, separator in (
        (path, _PATH_ATTRIBUTES, ";"),
        (query, _QUERY_ATTRIBUTES, "&"),
    ):
        for attribute in filter(None, part.split(separator)):
            name, equals, value = attribute.partition("=")
            if not equals or name not in allowed:
                raise RootKeyError(
                    f"PKCS#11 URI {uri!r}: unknown or malformed attribute {name!r} "
                    f"(known: {', '.join(sorted(_PATH_ATTRIBUTES | _QUERY_ATTRIBUTES))})"
                )
            if name in values:
                raise RootKeyError(f"PKCS#11 URI {uri!r}: {name} is given twice")
            decoded = unquote_to_bytes(value)
            if name == "id":
                raw_id = decoded
            values[name] = decoded.decode("utf-8", "replace")
    for needed in ("token", "object"):
        if not values.get(needed):
            raise RootKeyError(f"PKCS#11 URI {uri!r} must name the key's {needed} (label)")
    if values.get("type", "secret-key") != "secret-key":
        raise RootKeyError(f"PKCS#11 URI {uri!r}: a root key is a secret-key, not {values['type']}")
    return Pkcs11Uri(
        values["token"],
        values["object"],
        raw_id,
        values.get("module-path"),
        values.get("pin-source"),
    )


def read_pin(settings: ServerSettings) -> str | None:
    """The token's user PIN: --pkcs11-pin-file, else KMS_PKCS11_PIN."""
    if settings.pkcs11_pin_file is not None:
        return _pin_from_file(settings.pkcs11_pin_file)
    return settings.pkcs11_pin


def _pin_from_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as error:
        raise RootKeyError(f"cannot read the PKCS#11 PIN file {path}: {error.strerror}") from None


class Pkcs11RootKey(RootKey):
    """An AES key inside a PKCS#11 token; every wrap and unwrap is a call into the token."""

    def __init__(self, uri: Pkcs11Uri, module: str, session: Any, key: Any) -> None:
        # No material here: RootKey's own fields are not used.
        self._uri = uri
        self._module = module
        self._session = session
        self._key = key
        # A PKCS#11 session runs one operation at a time.
        self._lock = threading.Lock()
        self._id = hashlib.sha256(
            f"kms.v1/pkcs11-root-key\0{uri.token}\0{uri.object}".encode()
        ).digest()[:KEY_ID_BYTES]
        self.source = f"{uri} in PKCS#11 module {module}"

    def __repr__(self) -> str:
        return f"Pkcs11RootKey({self.key_id}, {self._uri})"

    @classmethod
    def open(cls, uri_text: str, module: Path | None, pin: str | None) -> Pkcs11RootKey:
        """Loads the module, logs in to the token and finds the key; each failure is named."""
        import pkcs11
        from pkcs11 import Attribute, KeyType, ObjectClass

        uri = parse_uri(uri_text)
        module_path = str(module) if module is not None else uri.module_path
        if not module_path:
            raise RootKeyError(f"root key {uri}: give the PKCS#11 module with --pkcs11-module")
        if uri.pin_source is not None and pin is None:
            pin = _pin_from_file(Path(uri.pin_source.removeprefix("file:")))
        if pin is None:
            raise RootKeyError(
                f"root key {uri}: give the token's PIN with --pkcs11-pin-file or {PIN_VARIABLE}"
            )
        try:
            library = pkcs11.lib(module_path)
        except (OSError, RuntimeError, pkcs11.PKCS11Error) as error:
            raise RootKeyError(
                f"cannot load the PKCS#11 module {module_path}: {_reason(error)}"
            ) from None
        try:
            token = library.get_token(token_label=uri.token)
        except pkcs11.NoSuchToken:
            raise RootKeyError(
                f"root key {uri}: the PKCS#11 module {module_path} has no token labelled "
                f"{uri.token!r}"
            ) from None
        except pkcs11.MultipleTokensReturned:
            raise RootKeyError(
                f"root key {uri}: several tokens are labelled {uri.token!r}"
            ) from None
        try:
            try:
                session = token.open(user_pin=pin)
            except pkcs11.UserAlreadyLoggedIn:
                # Login is per process: another key of this keyring (or this process) did it.
                session = token.open()
        except (pkcs11.PinIncorrect, pkcs11.PinLenRange, pkcs11.PinInvalid):
            raise RootKeyError(f"root key {uri}: wrong PIN for token {uri.token!r}") from None
        except pkcs11.PinLocked:
            raise RootKeyError(
                f"root key {uri}: the PIN of token {uri.token!r} is locked"
            ) from None
        except pkcs11.PKCS11Error as error:
            raise RootKeyError(
                f"root key {uri}: cannot log in to token {uri.token!r}: {_reason(error)}"
            ) from None
        try:
            search: dict[str, Any] = {
                "label": uri.object,
                "key_type": KeyType.AES,
                "object_class": ObjectClass.SECRET_KEY,
            }
            if uri.id is not None:
                search["id"] = uri.id
            try:
                key = session.get_key(**search)
            except pkcs11.NoSuchKey:
                raise RootKeyError(
                    f"root key {uri}: token {uri.token!r} holds no AES secret key labelled "
                    f"{uri.object!r}"
                ) from None
            except pkcs11.MultipleObjectsReturned:
                raise RootKeyError(
                    f"root key {uri}: token {uri.token!r} holds several AES keys labelled "
                    f"{uri.object!r}; name one with ;id="
                ) from None
            _check_attributes(uri, key, Attribute)
            root = cls(uri, module_path, session, key)
            root._self_test()
        except BaseException:
            session.close()
            raise
        return root

    def close(self) -> None:
        self._session.close()

    def _encrypt(self, nonce: bytes, plaintext: bytes | bytearray, associated_data: bytes) -> bytes:
        from pkcs11 import Mechanism, PKCS11Error
        from pkcs11.mechanisms import GCMParams

        try:
            with self._lock:
                sealed: bytes = self._key.encrypt(
                    bytes(plaintext),
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, associated_data, TAG_BYTES * 8),
                )
        except PKCS11Error as error:
            raise self._unavailable("wrap", error) from None
        return sealed

    def _decrypt(self, nonce: bytes, sealed: bytes, associated_data: bytes, what: str) -> bytearray:
        from pkcs11 import EncryptedDataInvalid, GeneralError, Mechanism, PKCS11Error
        from pkcs11.mechanisms import GCMParams

        try:
            with self._lock:
                # python-pkcs11 returns bytes: a copy this process cannot wipe (docs/operations.md).
                plaintext = self._key.decrypt(
                    sealed,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, associated_data, TAG_BYTES * 8),
                )
        except (EncryptedDataInvalid, GeneralError):
            # What SoftHSM2 and most tokens say when the GCM tag does not verify.
            raise IntegrityFailure(
                "WRAPPED_BLOB_INTEGRITY", f"{what} failed its integrity check"
            ) from None
        except PKCS11Error as error:
            raise self._unavailable("unwrap", error) from None
        return bytearray(plaintext)

    def _unavailable(self, operation: str, error: Exception) -> Unavailable:
        return Unavailable(
            "ROOT_KEY_UNAVAILABLE",
            f"the HSM could not {operation} with root key {self.key_id} ({self._uri}): "
            f"{_reason(error)}",
        )

    def _self_test(self) -> None:
        """A wrap and unwrap in the token at start, so a key that may not do them (its
        CKA_ALLOWED_MECHANISMS, a token without AES-GCM) stops the server now, not a call later."""
        try:
            blob = self.wrap_server_secret("pkcs11-self-test", b"\0" * 32)
            self.unwrap_server_secret("pkcs11-self-test", blob)
        except (Unavailable, IntegrityFailure) as error:
            raise RootKeyError(
                f"root key {self._uri}: the key may not wrap and unwrap with AES-GCM in the "
                f"token: {error.message}"
            ) from None


def _check_attributes(uri: Pkcs11Uri, key: Any, attribute: Any) -> None:
    checks = [
        (attribute.ENCRYPT, True, "may not encrypt (CKA_ENCRYPT is false)"),
        (attribute.DECRYPT, True, "may not decrypt (CKA_DECRYPT is false)"),
        (attribute.SENSITIVE, True, "is not sensitive (create it with CKA_SENSITIVE true)"),
        (attribute.EXTRACTABLE, False, "is extractable (create it with CKA_EXTRACTABLE false)"),
    ]
    for name, wanted, problem in checks:
        if bool(key[name]) != wanted:
            raise RootKeyError(f"root key {uri}: the key may not wrap: it {problem}")
    length = int(key[attribute.VALUE_LEN])
    if length != 32:
        raise RootKeyError(f"root key {uri}: the key is AES-{length * 8}, not AES-256")


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


def pkcs11_available(module: str | os.PathLike[str]) -> bool:
    """Whether python-pkcs11 is installed and the module file exists (for tests and tools)."""
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return False
    return Path(module).exists()
