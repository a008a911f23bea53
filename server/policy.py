"""Who may call: principals, how each one proves who it is, and what it may do to which keys.

The policy file is TOML; tokens are kept only as SHA-256 hex digests (tokens
are 256-bit random values, so a fast hash is enough):

    [principals.backup-a]
    auth = ["token"]                   # "token", "certificate" (mutual TLS, CN=backup-a) or both
    token_sha256 = ["9f86d081884c7d65..."]

    [[principals.backup-a.grants]]
    roles = ["backup"]
    keys = ["tenant-a", "tenant-a-*"]  # exact names or * patterns; ["*"] is every key

Everything in it is checked here, types included: whatever the file holds,
parsing it either gives a whole policy or raises PolicyError, nothing else.
"""

from __future__ import annotations

import hashlib
import os
import re
import string
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from server.domain.model import KEY_NAME_PATTERN, KeyScope, Principal, Role

# Principal names end up in every audit event's actor column (256 characters).
MAX_PRINCIPAL_NAME_LENGTH = 128
PRINCIPAL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
AUTH_METHODS = ("token", "certificate")
# What `*` stands for: any run of the characters a key name may hold.
_KEY_CHARACTERS = "[A-Za-z0-9._-]*"
_KEY_PATTERN_SYNTAX = re.compile(r"[A-Za-z0-9*][A-Za-z0-9._*-]{0,127}")
MAX_POLICY_BYTES = 4 * 1024 * 1024


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
    # Principals that may present a client certificate (auth includes "certificate").
    by_certificate: dict[str, Principal] = field(default_factory=dict, repr=False)
    # 2: the two-person rule for DestroyKeyVersion (server.usecases.lifecycle).
    destroy_approvals: int = 1

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            with path.open("rb") as handle:
                before = _identity(handle.fileno())
                data = handle.read(MAX_POLICY_BYTES + 1)
                after = _identity(handle.fileno())
        except OSError as error:
            raise PolicyError(f"cannot read policy file {path}: {error.strerror}") from None
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyError(f"policy file {path} is over {MAX_POLICY_BYTES} bytes")
        if before != after:
            # A writer is still at it: what was read may be a prefix that happens to parse.
            raise PolicyError(
                f"policy file {path} changed while it was read; replace it atomically "
                "(write a new file, then rename it over the old one)"
            )
        try:
            document = tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise PolicyError(f"policy file {path} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as error:
            raise PolicyError(f"policy file {path} is not valid TOML: {error}") from None
        return cls.parse(document, str(path))

    @classmethod
    def parse(cls, document: object, source: str = "policy") -> Policy:
        if not isinstance(document, dict):
            raise PolicyError(f"{source}: the policy must be a table")
        unknown = set(document) - {"principals", "destroy_approvals"}
        if unknown:
            raise PolicyError(f"{source}: unknown setting(s) {_names(unknown)}")
        approvals = document.get("destroy_approvals", 1)
        if type(approvals) is not int or approvals not in (1, 2):
            raise PolicyError(f"{source}: destroy_approvals must be 1 or 2")
        entries = document.get("principals", {})
        if not isinstance(entries, dict):
            raise PolicyError(f"{source}: [principals] must be a table")
        principals: dict[str, Principal] = {}
        by_token_hash: dict[str, Principal] = {}
        by_certificate: dict[str, Principal] = {}
        for name, entry in entries.items():
            where = f"{source}: principal {name!r}"
            if not isinstance(name, str) or PRINCIPAL_NAME_PATTERN.fullmatch(name) is None:
                raise PolicyError(
                    f"{where}: a principal name is 1 to {MAX_PRINCIPAL_NAME_LENGTH} characters "
                    "from A-Z a-z 0-9 . _ @ : -"
                )
            principal, auth, digests = _principal(name, entry, where)
            principals[name] = principal
            if "certificate" in auth:
                by_certificate[name] = principal
            for digest in digests:
                if digest in by_token_hash:
                    raise PolicyError(f"{where}: a token hash is listed twice")
                by_token_hash[digest] = principal
        return cls(principals, by_token_hash, by_certificate, approvals)

    def principal_for_token(self, token: str) -> Principal | None:
        # Looking up the digest leaks nothing about the token: SHA-256 is preimage resistant.
        return self.by_token_hash.get(hash_token(token))

    def principal_for_certificate(self, common_name: str) -> Principal | None:
        """Only a principal whose auth includes "certificate": a CN naming a token-only
        principal is no way in."""
        return self.by_certificate.get(common_name)


def _principal(name: str, entry: object, where: str) -> tuple[Principal, frozenset[str], list[str]]:
    if not isinstance(entry, dict):
        raise PolicyError(f"{where} must be a table")
    if "roles" in entry:
        raise PolicyError(
            f"{where}: roles go in grants, each naming the keys it covers: "
            f'[[principals.{name}.grants]] with roles = [...] and keys = ["..."] '
            '(keys = ["*"] for every key)'
        )
    unknown = set(entry) - {"auth", "token_sha256", "grants"}
    if unknown:
        raise PolicyError(f"{where}: unknown setting(s) {_names(unknown)}")
    if "auth" not in entry:
        raise PolicyError(
            f'{where}: add auth = ["token"], ["certificate"] or both: how this principal '
            "proves who it is"
        )
    auth = frozenset(_strings(entry["auth"], f"{where}: auth"))
    if not auth or not auth <= set(AUTH_METHODS):
        raise PolicyError(f'{where}: auth lists one or both of "token" and "certificate"')
    digests = [d.lower() for d in _strings(entry.get("token_sha256", []), "", where)]
    if any(len(d) != 64 or not _is_hex(d) for d in digests):
        raise PolicyError(f"{where}: token_sha256 entries are 64 hex characters")
    if digests and "token" not in auth:
        raise PolicyError(f'{where}: lists token_sha256 but its auth does not include "token"')
    if "token" in auth and not digests:
        raise PolicyError(f'{where}: auth includes "token" but token_sha256 lists no token hash')
    grants = entry.get("grants", [])
    if not isinstance(grants, list):
        raise PolicyError(f"{where}: grants must be an array of tables ([[...grants]])")
    patterns: dict[Role, list[str]] = {}
    for index, grant in enumerate(grants, start=1):
        for role, keys in _grant(grant, f"{where}, grant {index}"):
            patterns.setdefault(role, []).extend(keys)
    scopes = {role: compile_scope(keys) for role, keys in patterns.items()}
    return Principal(name, frozenset(scopes), scopes), auth, digests


def _grant(grant: object, where: str) -> Iterator[tuple[Role, list[str]]]:
    if not isinstance(grant, dict):
        raise PolicyError(f"{where} must be a table")
    unknown = set(grant) - {"roles", "keys"}
    if unknown:
        raise PolicyError(f"{where}: unknown setting(s) {_names(unknown)}")
    if "keys" not in grant:
        raise PolicyError(
            f'{where}: add keys = ["..."] naming the keys its roles apply to, as exact names '
            'or * patterns (keys = ["*"] for every key)'
        )
    keys = _strings(grant["keys"], f"{where}: keys")
    if not keys:
        raise PolicyError(f'{where}: keys lists no key (keys = ["*"] for every key)')
    for key in keys:
        if _KEY_PATTERN_SYNTAX.fullmatch(key) is None:
            raise PolicyError(
                f"{where}: {key!r} is not a key name or pattern: 1 to 128 characters from "
                "A-Z a-z 0-9 . _ - and *, starting with a letter, digit or *"
            )
    roles = _strings(grant.get("roles", []), f"{where}: roles")
    if not roles:
        raise PolicyError(f"{where}: add roles = [...], among {_role_names()}")
    try:
        parsed = [Role(role) for role in roles]
    except ValueError:
        raise PolicyError(f"{where}: roles must be among {_role_names()}") from None
    for role in parsed:
        yield role, keys


def compile_scope(keys: list[str]) -> KeyScope:
    """Exact names go in a set; every `*` pattern into one compiled alternation."""
    if "*" in keys:
        return KeyScope(everything=True)
    names = frozenset(k for k in keys if "*" not in k)
    wild = sorted({k for k in keys if "*" in k})
    pattern = None
    if wild:
        pattern = re.compile(
            "|".join(_KEY_CHARACTERS.join(re.escape(part) for part in w.split("*")) for w in wild)
        )
    # A pattern can only match names a key may have; an exact name must be one.
    if any(KEY_NAME_PATTERN.fullmatch(n) is None for n in names):
        raise PolicyError("a key name in keys must start with a letter or digit")
    return KeyScope(names, pattern)


def _strings(value: object, what: str, where: str = "") -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        if where:  # token_sha256 keeps its historic wording
            raise PolicyError(f"{where}: token_sha256 entries are 64 hex characters")
        raise PolicyError(f'{what} must be a list of strings, like ["a", "b"]')
    return list(value)


def _role_names() -> str:
    return ", ".join(r.value for r in Role)


def _names(keys: set[object]) -> str:
    return ", ".join(sorted(str(k) for k in keys))


def _identity(fd: int) -> tuple[int, int, int, int]:
    status = os.fstat(fd)
    return status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns
