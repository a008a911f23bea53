"""The server's own secrets: the audit MAC key, the state key and the audit signing key.

Made at the first start, stored only wrapped under the root key (each bound by associated
data to its name, the audit MAC key also to the sequence where the keyed chain starts),
and unwrapped into this process's memory at every start. Someone who can write the
database but has not the root key can neither read them nor replace them unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from kms_audit import checkpoint as checkpoints
from server.db.repository import Integrity, MetaStore, Repository
from server.domain.errors import IntegrityFailure
from server.domain.integrity import AuditMac, StateSeal
from server.domain.model import Action, AuditCheckpoint, Outcome
from server.keystore import crypto, root_keys

# Told every audit event before its transaction commits (the --audit-file sink).
AuditSink = Callable[[Sequence[Mapping[str, Any]]], None]

AUDIT_MAC_KEY = "audit_mac_key"
STATE_MAC_KEY = "state_mac_key"
AUDIT_SIGNING_KEY = "audit_signing_key"
KEYED_FROM = "audit_keyed_from"
# Replicas starting together race to make the keys; the losers use the winner's.
OPEN_ATTEMPTS = 5


class ServerKeysError(Exception):
    """The stored secrets are missing or do not unwrap: the database was tampered with."""


@dataclass(frozen=True)
class ServerKeys:
    audit: AuditMac
    state: StateSeal
    signing: Ed25519PrivateKey
    # The sequence of the event that started the keyed chain: every event from it on has a MAC.
    keyed_from: int

    def __repr__(self) -> str:
        return f"ServerKeys(<hidden>, keyed_from={self.keyed_from})"

    def integrity(self, sink: AuditSink | None = None) -> Integrity:
        return Integrity(self.audit, self.state, sink)

    @property
    def key_id(self) -> str:
        return checkpoints.key_id(self.signing.public_key())

    def public_key_pem(self) -> str:
        return checkpoints.public_key_pem(self.signing.public_key())

    def sign(self, sequence: int, chain_hash: str, time_us: int) -> AuditCheckpoint:
        signed = checkpoints.sign(self.signing, sequence, chain_hash, time_us)
        return AuditCheckpoint(
            signed.sequence, signed.chain_hash, signed.time_us, signed.key_id, signed.signature
        )


def open_or_create(
    sessions: sessionmaker[Session],
    keyring: crypto.RootKeyring,
    sink: AuditSink | None,
    now_us: Callable[[], int],
) -> ServerKeys:
    """Records the root keyring's check values on first start and refuses a different root key
    later; then unwraps the server's audit and state keys, making them on first start."""
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            with sessions.begin() as session:
                return _open_or_create(session, keyring, sink, now_us)
        except sa_exc.IntegrityError:
            # Another replica made the keys at the same moment: use its.
            if attempt == OPEN_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _open_or_create(
    session: Session,
    keyring: crypto.RootKeyring,
    sink: AuditSink | None,
    now_us: Callable[[], int],
) -> ServerKeys:
    bootstrap = MetaStore(session)
    recorded = root_keys.check_keyring(session, keyring)
    try:
        keys = load(bootstrap, keyring)
    except ServerKeysError as error:
        raise crypto.RootKeyError(str(error)) from None
    if keys is None:
        if bootstrap.any_keyed_audit_event():
            raise crypto.RootKeyError(
                "the server's audit keys are missing from a database whose audit log is "
                "keyed: they were deleted; restore the database from a backup"
            )
        keys = create(bootstrap, keyring, bootstrap.audit_head().sequence)
        start_keyed_chain(Repository(session, keys.integrity(sink)), keys, now_us())
    elif recorded:  # a new root key's check value: audited like any change
        root_keys.audit_recorded(Repository(session, keys.integrity(sink)), recorded, now_us())
    return keys


def load(repo: MetaStore, root_key: crypto.RootKey | crypto.RootKeyring) -> ServerKeys | None:
    """The stored secrets, unwrapped; None when this database has none yet."""
    stored = {name: repo.get_meta(name) for name in _ALL}
    if all(value is None for value in stored.values()):
        return None
    missing = [name for name, value in stored.items() if value is None]
    if missing:
        raise ServerKeysError(
            f"the database holds only some of the server's secrets ({', '.join(missing)} "
            "missing): it was tampered with; restore it from a backup"
        )
    keyed_from = _keyed_from(stored[KEYED_FROM])
    try:
        audit = root_key.unwrap_server_secret(
            f"{AUDIT_MAC_KEY}@{keyed_from}", _b(stored, AUDIT_MAC_KEY)
        )
        state = root_key.unwrap_server_secret(STATE_MAC_KEY, _b(stored, STATE_MAC_KEY))
        seed = root_key.unwrap_server_secret(AUDIT_SIGNING_KEY, _b(stored, AUDIT_SIGNING_KEY))
    except crypto.RootKeyMissing as absent:
        raise ServerKeysError(absent.message) from None
    except IntegrityFailure as failure:
        raise ServerKeysError(
            f"{failure.message}: the server's secrets in the database were altered "
            "(or the keyed chain's start was moved); restore the database from a backup"
        ) from None
    signing = Ed25519PrivateKey.from_private_bytes(bytes(seed))
    crypto.wipe(seed)
    return ServerKeys(AuditMac(audit), StateSeal(state), signing, keyed_from)


def create(
    repo_meta: MetaStore, root_key: crypto.RootKey | crypto.RootKeyring, head_sequence: int
) -> ServerKeys:
    """Makes the secrets and stores them wrapped, in the caller's transaction; the keyed chain
    will start at the event after the current head (`start_keyed_chain`)."""
    keyed_from = head_sequence + 1
    audit, state, seed = (crypto.new_secret_buffer() for _ in range(3))
    repo_meta.set_meta(KEYED_FROM, str(keyed_from).encode())
    repo_meta.set_meta(
        AUDIT_MAC_KEY, root_key.wrap_server_secret(f"{AUDIT_MAC_KEY}@{keyed_from}", audit)
    )
    repo_meta.set_meta(STATE_MAC_KEY, root_key.wrap_server_secret(STATE_MAC_KEY, state))
    repo_meta.set_meta(AUDIT_SIGNING_KEY, root_key.wrap_server_secret(AUDIT_SIGNING_KEY, seed))
    signing = Ed25519PrivateKey.from_private_bytes(bytes(seed))
    crypto.wipe(seed)
    return ServerKeys(AuditMac(audit), StateSeal(state), signing, keyed_from)


def start_keyed_chain(repo: Repository, keys: ServerKeys, now_us: int) -> None:
    """Seals every key and version row and writes the first keyed event, whose previous_hash
    anchors the unkeyed log before it. `repo` must carry `keys.integrity()`."""
    key_count, version_count = repo.seal_all_state(keys.keyed_from)
    sequence = repo.append_audit(
        time_us=now_us,
        actor="system",
        action=Action.START_KEYED_AUDIT,
        outcome=Outcome.ALLOWED,
        status_code="OK",
        detail=(
            f"keyed audit chain starts; signing key {keys.key_id}; sealed {key_count} keys "
            f"and {version_count} versions"
        ),
    )
    if sequence != keys.keyed_from:
        raise ServerKeysError("the audit log moved while the keyed chain was being started")


def stored_secrets(repo: MetaStore) -> list[tuple[str, str, bytes]]:
    """(server_meta name, associated-data name, blob) of every stored secret."""
    keyed_from = _keyed_from(repo.get_meta(KEYED_FROM))
    out = []
    for name, bound in (
        (AUDIT_MAC_KEY, f"{AUDIT_MAC_KEY}@{keyed_from}"),
        (STATE_MAC_KEY, STATE_MAC_KEY),
        (AUDIT_SIGNING_KEY, AUDIT_SIGNING_KEY),
    ):
        blob = repo.get_meta(name)
        if blob is not None:
            out.append((name, bound, blob))
    return out


def rewrap(repo: MetaStore, keyring: crypto.RootKeyring) -> int:
    """Rewraps under the current root key every secret still under an older one, in the
    caller's transaction; returns how many."""
    count = 0
    for name, bound, blob in stored_secrets(repo):
        if keyring.is_current(blob):
            continue
        secret = keyring.unwrap_server_secret(bound, blob)
        try:
            repo.set_meta(name, keyring.wrap_server_secret(bound, secret))
        finally:
            crypto.wipe(secret)
        count += 1
    return count


def _keyed_from(value: bytes | None) -> int:
    try:
        return int((value or b"").decode("ascii"))
    except ValueError:
        raise ServerKeysError("the keyed chain's start in the database is malformed") from None


def _b(stored: dict[str, bytes | None], name: str) -> bytes:
    value = stored[name]
    assert value is not None
    return value


_ALL = (KEYED_FROM, AUDIT_MAC_KEY, STATE_MAC_KEY, AUDIT_SIGNING_KEY)
