"""`kms-server --dev`: creates a data directory with a root key, one token per role and a policy."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from server.config import ServerSettings
from server.domain.model import Role
from server.keystore.crypto import RootKey
from server.policy import hash_token


def bootstrap(settings: ServerSettings) -> list[Path]:
    """Creates what is missing and returns the token file paths (never the tokens)."""
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if settings.root_key is None and not settings.root_key_file.exists():
        RootKey.create(settings.root_key_file)
    tokens_dir = settings.data_dir / "tokens"
    tokens_dir.mkdir(mode=0o700, exist_ok=True)
    token_files = []
    lines = ["# Written by kms-server --dev: one principal per role, tokens in tokens/.\n"]
    for role in Role:
        token_file = tokens_dir / role.value
        if not token_file.exists():
            _write_private(token_file, secrets.token_urlsafe(32) + "\n")
        token = token_file.read_text().strip()
        token_files.append(token_file)
        # Token only, and every key, said explicitly: a copy edited for production shows
        # what each principal may do (a certificate with CN=dev-admin is no way in).
        lines.append(
            f'\n[principals.dev-{role.value}]\nauth = ["token"]\n'
            f'token_sha256 = ["{hash_token(token)}"]\n'
            f'\n[[principals.dev-{role.value}.grants]]\nroles = ["{role.value}"]\nkeys = ["*"]\n'
        )
    if not settings.policy_file.exists():
        _write_private(settings.policy_file, "".join(lines))
    return token_files


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
