"""Reading the audit log: list its events, verify it whole, sign checkpoints of it.

Verification walks the keyed hash chain with its MACs and then replays the log's state
changes against every key and version row (server.domain.state_replay), so a row put back
from an older copy is caught as well as an edited one. Only an auditor of every key may
verify or checkpoint: the chain links events about every key.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from server.db.engine import read_snapshot_options
from server.db.repository import Repository, audit_event_from_row, sealed_key, sealed_version
from server.domain import model
from server.domain.audit_chain import verify_chain
from server.domain.errors import (
    FailedPrecondition,
    IntegrityFailure,
    InvalidArgument,
    KmsError,
    NotFound,
)
from server.domain.model import (
    Action,
    AuditCheckpoint,
    AuditEvent,
    AuditVerification,
    Principal,
    Role,
)
from server.domain.state_replay import StateReplay, StoredRow
from server.keystore.server_keys import ServerKeys
from server.usecases import guards, paging
from server.usecases.transactions import DATABASE_ERRORS, AuditContext, Transactions, now_us

log = logging.getLogger(__name__)

# The server's keys, once check_root_key has unwrapped them.
ServerKeysSource = Callable[[], ServerKeys]


class AuditLog:
    def __init__(self, transactions: Transactions, server_keys: ServerKeysSource) -> None:
        self._tx = transactions
        self._server_keys = server_keys

    def list_audit_events(
        self, caller: Principal, page_size: int, page_token: str, key_name: str
    ) -> tuple[list[AuditEvent], str]:
        audit = AuditContext(key_name=key_name)

        def work(repo: Repository) -> tuple[list[AuditEvent], str]:
            guards.require(caller, Role.AUDITOR)
            scope = caller.scope(Role.AUDITOR)
            if key_name:
                model.check_key_name(key_name)
                guards.require_key(caller, Role.AUDITOR, key_name)
            limit = model.check_page_size(page_size)
            after = model.check_page_token(page_token)
            # Events about no key (denials before a key was named, verifications) are
            # for auditors of every key only.
            rows, last, more = paging.scoped_page(
                lambda start, count: repo.list_audit(start, count, key_name),
                lambda row: bool(row.key_name) and scope.allows(row.key_name),
                lambda row: int(row.sequence),
                after,
                limit,
                scope.everything or bool(key_name),
            )
            events = [audit_event_from_row(row) for row in rows]
            return events, str(last) if more else ""

        return self._tx.run(caller.name, Action.LIST_AUDIT, audit, work)

    def verify_audit_log(self, caller: Principal) -> AuditVerification:
        audit = AuditContext()
        try:
            guards.require_whole_log(caller, "verifying")
        except KmsError as error:
            self._tx.audit_denial(caller.name, Action.VERIFY_AUDIT, audit, error)
            raise
        # Walk the chain in a read-only snapshot: on SQLite a write transaction would
        # hold the database's write lock for the whole walk (about a minute per 1M events).
        result = self._verify_in_snapshot()
        audit.detail = (
            f"intact, {result.events_checked} events"
            if result.intact
            else f"broken at event {result.first_broken_sequence}: {result.problem}"
        )
        if not result.intact:
            log.error("audit log verification failed: %s", audit.detail)
        return self._tx.run(caller.name, Action.VERIFY_AUDIT, audit, lambda repo: result)

    def _verify_in_snapshot(self) -> AuditVerification:
        """The chain with its MACs, then the stored state against what the log says."""
        keys = self._server_keys()
        try:
            with self._tx.sessions() as session:
                dialect = session.get_bind().dialect.name
                session.connection(execution_options=read_snapshot_options(dialect))
                repo = Repository(session, self._tx.integrity)
                head = repo.audit_head()
                replay = StateReplay()
                chain = verify_chain(
                    replay.watch(repo.iter_audit()), head, keys.audit, keys.keyed_from
                )
                if not chain.intact:
                    return chain
                key_rows, version_rows = repo.all_state()
                stored_keys = [StoredRow(sealed_key(row), row.mac) for row in key_rows]
                stored_versions = [StoredRow(sealed_version(row), row.mac) for row in version_rows]
                problem = next(replay.problems(stored_keys, stored_versions, keys.state), "")
        except DATABASE_ERRORS as error:
            raise self._tx.unavailable(error) from None
        if problem:
            return dataclasses.replace(chain, intact=False, problem=f"state: {problem}")
        return chain

    def audit_checkpoint(self, caller: Principal, sequence: int) -> AuditCheckpoint:
        """The server's signature over an event's chain hash (the head's when `sequence` is 0),
        given only after that event's (or the head's) MAC checks."""
        audit = AuditContext(detail=f"event {sequence}" if sequence else "head")

        def work(repo: Repository) -> AuditCheckpoint:
            guards.require_whole_log(caller, "checkpointing")
            if not 0 <= sequence <= model.MAX_SEQUENCE:
                raise InvalidArgument("SEQUENCE_OUT_OF_RANGE", "sequence is out of range")
            keys = self._server_keys()
            head = repo.audit_head()
            if sequence == 0 or sequence == head.sequence:
                if not keys.audit.head_ok(head.sequence, head.event_hash, head.mac):
                    raise IntegrityFailure(
                        "AUDIT_INTEGRITY",
                        "the audit head fails its MAC check; run kmsctl audit verify",
                    )
                return keys.sign(head.sequence, head.event_hash, now_us())
            event = repo.audit_event(sequence)
            if event is None or sequence > head.sequence:
                raise NotFound(
                    "AUDIT_EVENT_NOT_FOUND",
                    f"the audit log has no event {sequence}; it ends at event {head.sequence}",
                )
            if sequence < keys.keyed_from:
                raise FailedPrecondition(
                    "AUDIT_EVENT_NOT_KEYED",
                    f"event {sequence} is older than the keyed chain, which starts at event "
                    f"{keys.keyed_from}; checkpoint that event or a later one",
                )
            if not keys.audit.event_ok(event.sequence, event.event_hash, event.mac):
                raise IntegrityFailure(
                    "AUDIT_INTEGRITY",
                    f"audit event {sequence} fails its MAC check; run kmsctl audit verify",
                )
            return keys.sign(event.sequence, event.event_hash, now_us())

        return self._tx.run(caller.name, Action.CHECKPOINT_AUDIT, audit, work)

    def audit_public_key(self, caller: Principal) -> tuple[str, str]:
        """The audit signing key's public half (PEM) and its key id."""

        def work(repo: Repository) -> tuple[str, str]:
            guards.require(caller, Role.AUDITOR)
            keys = self._server_keys()
            return keys.public_key_pem(), keys.key_id

        return self._tx.run(caller.name, Action.READ_AUDIT_PUBLIC_KEY, AuditContext(), work)

    def record_denial(self, actor: str, action: Action, error: KmsError) -> None:
        """Audits a call refused before it reached a use case (for example unauthenticated)."""
        self._tx.audit_denial(actor, action, AuditContext(), error)
