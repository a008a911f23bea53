"""The server's keyring of root keys: built from the settings, checked against the database.

server_meta holds one check value per root key that some blob may still need
(`root_key_check/<key id>`), plus, in a database made before key ids, the format-1
`root_key_check` of the key its format-1 blobs belong to. At start the server must hold every
key with a check value; it refuses to start otherwise, naming the missing key's id.
`kms-server rewrap-root-keys` removes a key's check value once no blob needs it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.config import ServerSettings
from server.db.models import ServerMetaRow
from server.db.repository import Repository
from server.domain.model import Action, Outcome
from server.keystore.crypto import RootKey, RootKeyError, RootKeyring

log = logging.getLogger(__name__)

LEGACY_CHECK = "root_key_check"  # format 1, written before key ids existed
LEGACY_ID = "root_key_legacy_id"  # the id of the key LEGACY_CHECK belongs to, once known
CHECK_PREFIX = "root_key_check/"
PKCS11_SCHEME = "pkcs11:"


def load_keyring(settings: ServerSettings) -> RootKeyring:
    """The current root key (`--root-key`, else `--root-key-file`) and the previous ones."""
    current = (
        load_root_key(settings.root_key, settings)
        if settings.root_key
        else RootKey.load(settings.root_key_file)
    )
    previous = [load_root_key(entry, settings) for entry in settings.previous_root_keys]
    return RootKeyring(current, previous)


def load_root_key(entry: str, settings: ServerSettings) -> RootKey:
    """A file path, or a PKCS#11 URI (then the key stays in the token)."""
    if not entry.startswith(PKCS11_SCHEME):
        return RootKey.load(Path(entry))
    from server.keystore import pkcs11_root  # python-pkcs11 is loaded only when an HSM key is used

    return pkcs11_root.Pkcs11RootKey.open(
        entry, settings.pkcs11_module, pkcs11_root.read_pin(settings)
    )


def check_keyring(session: Session, keyring: RootKeyring) -> list[str]:
    """Refuses a keyring that lacks a key the database still needs, or holds one that does not
    match its check value; records the current key's check value if it is new. In the
    caller's transaction; returns what it recorded, for the audit log (`audit_recorded`)."""
    recorded: list[str] = []
    stored = _checks(session)
    legacy = stored.pop(LEGACY_CHECK, None)
    legacy_id = stored.pop(LEGACY_ID, None)
    if legacy is not None:
        matching = [key for key in keyring.keys if key.matches(legacy)]
        if not matching:
            named = f"root key {legacy_id.decode()}" if legacy_id else "the root key"
            raise RootKeyError(
                f"the root key does not match this database: it was initialised with {named}, "
                "which this server was not given (check --root-key-file / --root-key / "
                "--previous-root-key-file)"
            )
        owner = matching[0]
        keyring.legacy, keyring.legacy_id = owner, owner.key_id
        if legacy_id is None:  # the first start since key ids: name the key from now on
            _set(session, LEGACY_ID, owner.key_id.encode())
        if CHECK_PREFIX + owner.key_id not in stored:
            stored[CHECK_PREFIX + owner.key_id] = owner.check_value()
            _set(session, CHECK_PREFIX + owner.key_id, stored[CHECK_PREFIX + owner.key_id])
            recorded.append(f"root key {owner.key_id} named as the key of the format-1 blobs")
    for name, value in sorted(stored.items()):
        key_id = name.removeprefix(CHECK_PREFIX)
        key = keyring.get(key_id)
        if key is None:
            raise RootKeyError(
                f"the root key does not match this database: it holds blobs wrapped under root "
                f"key {key_id}, which this server was not given (current: "
                f"{keyring.current.key_id}); add it with --previous-root-key-file"
            )
        if not key.matches(value):
            raise RootKeyError(
                f"{key.describe()} does not match the check value this database holds for it"
            )
    current = keyring.current
    if CHECK_PREFIX + current.key_id not in stored:
        stored[CHECK_PREFIX + current.key_id] = current.check_value()
        _set(session, CHECK_PREFIX + current.key_id, stored[CHECK_PREFIX + current.key_id])
        log.info("recorded %s as this database's current root key", current.describe())
        recorded.append(f"root key {current.key_id} recorded as the current root key")
    unused = [key.describe() for key in keyring.keys if CHECK_PREFIX + key.key_id not in stored]
    if unused:
        log.info("no blob needs these previous root keys: %s", "; ".join(unused))
    return recorded


def audit_recorded(repo: Repository, recorded: list[str], now_us: int) -> None:
    """One `root_key.record` event for what `check_keyring` recorded, in the same transaction."""
    repo.append_audit(
        time_us=now_us,
        actor="system",
        action=Action.ROOT_KEY_RECORD,
        outcome=Outcome.ALLOWED,
        status_code="OK",
        detail="; ".join(recorded),
    )


def needed_key_ids(session: Session) -> list[str]:
    """The ids of the root keys whose check value says some blob may still need them."""
    return sorted(
        name.removeprefix(CHECK_PREFIX)
        for name in _checks(session)
        if name.startswith(CHECK_PREFIX)
    )


def retire(session: Session, keyring: RootKeyring) -> list[str]:
    """Removes the check values of every key but the current one (no blob needs them any
    more: the caller has checked); returns their ids."""
    retired = []
    for name in _checks(session):
        if name == CHECK_PREFIX + keyring.current.key_id:
            continue
        row = session.get(ServerMetaRow, name)
        if row is not None:
            session.delete(row)
        if name.startswith(CHECK_PREFIX):
            retired.append(name.removeprefix(CHECK_PREFIX))
    session.flush()
    return sorted(retired)


def _checks(session: Session) -> dict[str, bytes]:
    rows = session.execute(
        select(ServerMetaRow.name, ServerMetaRow.value).where(
            (ServerMetaRow.name == LEGACY_CHECK)
            | (ServerMetaRow.name == LEGACY_ID)
            | ServerMetaRow.name.startswith(CHECK_PREFIX)
        )
    ).all()
    return {str(name): bytes(value) for name, value in rows}


def _set(session: Session, name: str, value: bytes) -> None:
    session.merge(ServerMetaRow(name=name, value=value))
