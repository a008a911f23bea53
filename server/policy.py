"""Who may call: principals, their roles, and how each one proves who it is.

The policy file is TOML; tokens are kept only as SHA-256 hex digests (tokens
are 256-bit random values, so a fast hash is enough):

    [principals.ops-admin]
    roles = ["admin"]
    token_sha256 = ["9f86d081884c7d65..."]

    [principals.backup-agent]          # may also connect with a client
    roles = ["backup"]                 # certificate whose CN is backup-agent
"""

from __future__ import annotations

import hashlib
import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from server.domain.model import Principal, Role

# Principal names end up in every audit event's actor column (256 characters).
MAX_PRINCIPAL_NAME_LENGTH = 128
PRINCIPAL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")


class PolicyError(Exception):
    """The policy file cannot be read or says something invalid."""


def _is_hex(text: str) -> bool:
    return all(c in string.hexdigits for c in text)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Policy:
    principals: dict[str, Principal]
    by_token_hash: dict[str, Principal] = field(repr=False)
    # 2: the two-person rule for DestroyKeyVersion (server.usecases.lifecycle).
    destroy_approvals: int = 1

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            document = tomllib.loads(path.read_text())
        except OSError as error:
            raise PolicyError(f"cannot read policy file {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise PolicyError(f"policy file {path} is not valid TOML: {error}") from None
        return cls.parse(document, str(path))

    @classmethod
    def parse(cls, document: dict[str, object], source: str = "policy") -> Policy:
        unknown = set(document) - {"principals", "destroy_approvals"}
        if unknown:
            raise PolicyError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
        approvals = document.get("destroy_approvals", 1)
        if type(approvals) is not int or approvals not in (1, 2):
            raise PolicyError(f"{source}: destroy_approvals must be 1 or 2")
        entries = document.get("principals", {})
        if not isinstance(entries, dict):
            raise PolicyError(f"{source}: [principals] must be a table")
        principals: dict[str, Principal] = {}
        by_token_hash: dict[str, Principal] = {}
        for name, entry in entries.items():
            where = f"{source}: principal {name!r}"
            if PRINCIPAL_NAME_PATTERN.fullmatch(name) is None:
                raise PolicyError(
                    f"{where}: a principal name is 1 to {MAX_PRINCIPAL_NAME_LENGTH} characters "
                    "from A-Z a-z 0-9 . _ @ : -"
                )
            if not isinstance(entry, dict):
                raise PolicyError(f"{where} must be a table")
            unknown = set(entry) - {"roles", "token_sha256"}
            if unknown:
                raise PolicyError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
            try:
                roles = frozenset(Role(role) for role in entry.get("roles", []))
            except ValueError:
                raise PolicyError(
                    f"{where}: roles must be among {', '.join(r.value for r in Role)}"
                ) from None
            principal = Principal(name, roles)
            principals[name] = principal
            for digest in entry.get("token_sha256", []):
                if not isinstance(digest, str) or len(digest) != 64 or not _is_hex(digest):
                    raise PolicyError(f"{where}: token_sha256 entries are 64 hex characters")
                if digest.lower() in by_token_hash:
                    raise PolicyError(f"{where}: a token hash is listed twice")
                by_token_hash[digest.lower()] = principal
        return cls(principals, by_token_hash, approvals)

    def principal_for_token(self, token: str) -> Principal | None:
        # Looking up the digest leaks nothing about the token: SHA-256 is preimage resistant.
        return self.by_token_hash.get(hash_token(token))

    def principal_for_certificate(self, common_name: str) -> Principal | None:
        return self.principals.get(common_name)
