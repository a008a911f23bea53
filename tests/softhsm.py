"""A real SoftHSM2 token per test, in a temporary directory (SOFTHSM2_CONF), holding AES keys
made inside it: sensitive and non-extractable unless a test asks otherwise.

Skips, saying why, where SoftHSM2 (the Debian package softhsm2) or python-pkcs11 is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN = "kms-test"
KEY_LABEL = "kms-root"
USER_PIN = "4711-user"
SO_PIN = "4711-so"


def softhsm_module() -> str | None:
    return next((path for path in MODULE_CANDIDATES if Path(path).exists()), None)


@dataclass
class SoftHsm:
    module: str
    conf: Path
    pin_file: Path

    def uri(self, key_label: str = KEY_LABEL, token: str = TOKEN) -> str:
        return f"pkcs11:token={token};object={key_label}"

    def server_flags(self, key_label: str = KEY_LABEL) -> dict[str, str]:
        """start_kms overrides naming this token's key as the current root key."""
        return {
            "root_key": self.uri(key_label),
            "pkcs11_module": self.module,
            "pkcs11_pin_file": str(self.pin_file),
        }

    def cli_flags(self, key_label: str = KEY_LABEL) -> list[str]:
        return ["--pkcs11-module", self.module, "--pkcs11-pin-file", str(self.pin_file)]

    def _session(self) -> Any:
        import pkcs11

        token = pkcs11.lib(self.module).get_token(token_label=TOKEN)
        try:
            return token.open(user_pin=USER_PIN, rw=True)
        except pkcs11.UserAlreadyLoggedIn:  # login is per process, and a server here holds one
            return token.open(rw=True)

    def make_key(
        self,
        label: str = KEY_LABEL,
        *,
        sensitive: bool = True,
        extractable: bool = False,
        encrypt: bool = True,
    ) -> None:
        """An AES-256 key generated inside the token (its value never leaves it)."""
        from pkcs11 import Attribute, KeyType

        with self._session() as session:
            session.generate_key(
                KeyType.AES,
                256,
                label=label,
                store=True,
                template={
                    Attribute.SENSITIVE: sensitive,
                    Attribute.EXTRACTABLE: extractable,
                    Attribute.ENCRYPT: encrypt,
                    Attribute.DECRYPT: True,
                },
            )

    def delete_key(self, label: str = KEY_LABEL) -> None:
        from pkcs11 import KeyType, ObjectClass

        with self._session() as session:
            session.get_key(
                label=label, key_type=KeyType.AES, object_class=ObjectClass.SECRET_KEY
            ).destroy()

    def key_attribute(self, name: str, label: str = KEY_LABEL) -> Any:
        from pkcs11 import Attribute, KeyType, ObjectClass

        with self._session() as session:
            key = session.get_key(
                label=label, key_type=KeyType.AES, object_class=ObjectClass.SECRET_KEY
            )
            return key[getattr(Attribute, name)]


@pytest.fixture(name="hsm")
def hsm_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHsm]:
    """A fresh token with one non-extractable, sensitive AES-256 key labelled KEY_LABEL."""
    module = softhsm_module()
    if module is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (apt-get install softhsm2): PKCS#11 tests skipped")
    try:
        import pkcs11
    except ImportError:
        pytest.skip("python-pkcs11 is not installed: PKCS#11 tests skipped")
    directory = tmp_path / "softhsm"
    (directory / "tokens").mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--so-pin", SO_PIN,
         "--pin", USER_PIN],
        check=True,
        capture_output=True,
    )  # fmt: skip
    pin_file = directory / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    # The module reads SOFTHSM2_CONF when it is initialised: once per test, in this process.
    pkcs11.unload(module)
    hsm = SoftHsm(module, conf, pin_file)
    hsm.make_key()
    try:
        yield hsm
    finally:
        pkcs11.unload(module)
