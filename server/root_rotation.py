"""`kms-server rewrap-root-keys`: rewraps every blob under an older root key under the current
one while the servers keep serving.

In batches, each its own transaction with an audit event (written through the service's
Integrity, so the keyed chain stays intact), so it can be stopped and run again at any time:
a batch takes only blobs still under another key, so a second run finds nothing to do. Once
nothing is left, the check values of the older keys are removed in a last audited
transaction: the database then says no blob needs them, and servers start without them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy import ColumnElement, Engine, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from server.config import ServerSettings
from server.db.engine import make_sessionmaker
from server.db.models import KeyVersionRow
from server.db.repository import Integrity, Repository
from server.domain.errors import KmsError
from server.domain.model import Action, Outcome
from server.keystore import crypto, root_keys, server_keys

DEFAULT_BATCH_SIZE = 100
ACTOR = "system:rewrap-root-keys"
_RETRYABLE_SQLSTATES = {"40001", "40P01"}
MAX_ATTEMPTS = 10

T = TypeVar("T")


@dataclass
class RewrapResult:
    current_key_id: str
    secrets_rewrapped: int = 0
    versions_rewrapped: int = 0
    batches: int = 0
    retired_key_ids: list[str] = field(default_factory=list)


def rewrap_root_keys(
    engine: Engine,
    keyring: crypto.RootKeyring,
    integrity: Integrity,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    report: Callable[[str], None] = print,
    now_us: Callable[[], int] = lambda: time.time_ns() // 1000,
) -> RewrapResult:
    """Rewraps the server secrets, then the version material batch by batch, then retires the
    older keys' check values. `integrity` is the service's (`server_keys.ServerKeys`)."""
    sessions = make_sessionmaker(engine)
    current = keyring.current.key_id
    result = RewrapResult(current)

    def audited(repo: Repository, detail: str) -> None:
        repo.append_audit(
            time_us=now_us(),
            actor=ACTOR,
            action=Action.ROOT_KEY_REWRAP,
            outcome=Outcome.ALLOWED,
            status_code="OK",
            detail=detail,
        )
        repo.seal_changed_state()

    def secrets(session: Session) -> int:
        repo = Repository(session, integrity)
        count = server_keys.rewrap(repo, keyring)
        if count:
            audited(repo, f"rewrapped {count} server secrets under root key {current}")
        return count

    result.secrets_rewrapped = _retrying(sessions, secrets)
    if result.secrets_rewrapped:
        report(f"rewrapped {result.secrets_rewrapped} server secrets under root key {current}")
    total = _retrying(sessions, lambda session: _count_left(session, keyring))
    report(f"{total} key versions to rewrap under root key {current}")

    def batch(session: Session) -> int:
        repo = Repository(session, integrity)
        done = 0
        for key_name, version in _next_batch(session, keyring, batch_size):
            row = repo.get_version(key_name, version, for_update=True)  # checks its MAC
            if (
                row is None
                or row.wrapped_material is None
                or keyring.is_current(row.wrapped_material)
            ):
                continue  # destroyed or rewrapped since the batch was chosen
            material = keyring.unwrap_version_material(key_name, version, row.wrapped_material)
            try:
                row.wrapped_material = keyring.wrap_version_material(key_name, version, material)
            finally:
                crypto.wipe(material)
            done += 1
        if done:
            left = _count_left(session, keyring)
            audited(repo, f"rewrapped {done} key versions under root key {current}; {left} left")
        return done

    while True:
        done = _retrying(sessions, batch)
        if not done:
            break
        result.versions_rewrapped += done
        result.batches += 1
        report(f"rewrapped {result.versions_rewrapped} of {total} key versions")

    def finish(session: Session) -> list[str]:
        repo = Repository(session, integrity)
        left = _count_left(session, keyring) + sum(
            not keyring.is_current(blob) for _, _, blob in server_keys.stored_secrets(repo)
        )
        if left:
            # A server still configured with an older key as its current one: fix it, run again.
            raise crypto.RootKeyError(
                f"{left} blobs were written under an older root key meanwhile: is every server "
                f"started with root key {current} as its current key? Then run this again"
            )
        retired = root_keys.retire(session, keyring)
        if retired:
            audited(
                repo,
                f"no blob needs root keys {', '.join(retired)} any more; every blob is under "
                f"root key {current}",
            )
        return retired

    result.retired_key_ids = _retrying(sessions, finish)
    for key_id in result.retired_key_ids:
        report(f"no blob needs root key {key_id} any more: remove it from every server's settings")
    report(f"every blob is under root key {current}")
    return result


def _not_current(keyring: crypto.RootKeyring) -> ColumnElement[bool]:
    """Rows whose blob does not start with the current key's format-2 header."""
    header = crypto.ROOT_BLOB_FORMAT + keyring.current.key_id_bytes
    return func.substr(KeyVersionRow.wrapped_material, 1, len(header)) != header


def _next_batch(session: Session, keyring: crypto.RootKeyring, size: int) -> list[tuple[str, int]]:
    rows = session.execute(
        select(KeyVersionRow.key_name, KeyVersionRow.version)
        .where(KeyVersionRow.wrapped_material.is_not(None), _not_current(keyring))
        .order_by(KeyVersionRow.key_name, KeyVersionRow.version)
        .limit(size)
    ).all()
    return [(str(name), int(version)) for name, version in rows]


def _count_left(session: Session, keyring: crypto.RootKeyring) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(KeyVersionRow)
            .where(KeyVersionRow.wrapped_material.is_not(None), _not_current(keyring))
        )
        or 0
    )


def _retrying(sessions: Callable[[], Session], work: Callable[[Session], T]) -> T:
    """One transaction, retried when it lost a race with the serving replicas."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            with sessions() as session, session.begin():
                return work(session)
        except sa_exc.DBAPIError as error:
            sqlstate = getattr(error.orig, "sqlstate", None)
            transient = sqlstate in _RETRYABLE_SQLSTATES or "database is locked" in str(error.orig)
            if not transient or attempt == MAX_ATTEMPTS:
                raise
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


def run(settings: ServerSettings, batch_size: int) -> int:
    """The `kms-server rewrap-root-keys` command, with the servers' own settings and keys."""
    from server.app import open_database
    from server.db.audit_file import AuditFile, AuditSinkError
    from server.service import KeyManagementService

    keyring = root_keys.load_keyring(settings)
    engine = open_database(settings, upgrade=False)
    audit_file = None
    try:
        try:
            audit_file = AuditFile(settings.audit_file) if settings.audit_file else None
        except AuditSinkError as error:
            raise crypto.RootKeyError(f"--audit-file: {error}") from None
        service = KeyManagementService(engine, keyring, audit_sink=audit_file)
        try:
            service.check_root_key()  # refuses a keyring that lacks a key some blob needs
            integrity = service.server_keys.integrity(audit_file)
        finally:
            service.close()
        try:
            rewrap_root_keys(
                engine,
                keyring,
                integrity,
                batch_size=batch_size,
                report=lambda line: print(line, flush=True),
            )
        except KmsError as error:  # a row that fails its MAC, a blob under a missing key
            raise crypto.RootKeyError(f"rewrap stopped: {error.message}") from None
    finally:
        if audit_file is not None:
            audit_file.close()
        engine.dispose()
    return 0
