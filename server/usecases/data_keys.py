"""Data keys: GetActiveKey issues one per backup, ResolveKeyForBackup gives it back.

These are the calls backups make all day, so they go through group commit: concurrent
calls share one transaction on the driver's own connection (server.db.repository's
`DataKeyStore`), each call's binding and audit event, allowed or denied, in it, and every
call is answered once that transaction has committed. Nothing is acknowledged before it
is durable.

The input and the caller's role are checked before a call joins a batch (a refusal is
audited in its own transaction); the batch then reads every binding and active version
it needs in one statement each, checks each row's MAC once, and decides every call.

A binding names who made it: a GetActiveKey for a bound backup id is answered only as the
same principal's retry within the retry window. Archive headers are plaintext, so a backup
id is no secret, and without this the backup role could read any backup's data key.
ResolveKeyForBackup without a binding (lost to a database restore) may offer the archive
header's reference: that recovery is rare and runs unbatched (server.usecases.recovery).

Each version counts the data keys it has wrapped, once per batch: AES-GCM with random 96-bit
nonces must stay well below 2^32 encryptions per key (NIST SP 800-38D). A batch that would
take the active version past `max_data_keys_per_version` first has the key rotated
(server.usecases.auto_rotation) and then runs on the new version: no call fails for it. The
count is read again under the version's row lock before it is written, so replicas sharing
one database add up exactly, and each GetActiveKey that wrapped a key says the count after
it in its audit event (`data_keys_wrapped=N`), which is how the audit replay checks it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.db.driver import driver_transaction
from server.db.repository import DataKeyStore, VersionFacts
from server.domain import model
from server.domain.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    IntegrityFailure,
    KmsError,
    NotFound,
    Unavailable,
)
from server.domain.integrity import SealedBinding
from server.domain.model import (
    EVERY_KEY,
    Action,
    DataKey,
    KeyScope,
    Outcome,
    Principal,
    Role,
)
from server.keystore import crypto
from server.usecases import guards
from server.usecases.group_commit import GroupCommitter
from server.usecases.materials import KeyMaterials
from server.usecases.recovery import BackupKeyReference, BindingRecovery
from server.usecases.transactions import (
    AUDIT_WRITE_ERRORS,
    DATABASE_ERRORS,
    MAX_ATTEMPTS,
    AuditContext,
    AuditWriteFailed,
    Transactions,
    back_off,
    is_transient,
    now_us,
    storable,
)

log = logging.getLogger(__name__)

DEFAULT_RETRY_WINDOW_SECONDS = 15 * 60
# Rotates a key whose active version has no room for this many more data keys; returns
# whether it rotated (False: another replica did first, or there was room after all).
MakeRoom = Callable[[str, int], bool]


class DataKeys:
    def __init__(
        self,
        transactions: Transactions,
        materials: KeyMaterials,
        recovery: BindingRecovery,
        make_room: MakeRoom,
        *,
        retry_window_seconds: float = DEFAULT_RETRY_WINDOW_SECONDS,
        max_data_keys_per_version: int = model.DEFAULT_MAX_DATA_KEYS_PER_VERSION,
    ) -> None:
        self._tx = transactions
        self._materials = materials
        self._recovery = recovery
        self._make_room = make_room
        # How long the principal that made a binding may get its data key again (a retry).
        self._retry_window_us = int(retry_window_seconds * 1_000_000)
        self._max_wrapped = max_data_keys_per_version
        self._committer = GroupCommitter(self._run_batch)

    def close(self) -> None:
        """Returns once the batches of in-flight calls have committed."""
        self._committer.stop()

    async def get_active_key(self, caller: Principal, key_name: str, backup_id: str) -> DataKey:
        """A coroutine: it awaits its batch's commit without holding a thread."""
        return await self._in_next_batch(*_issue_request(caller, key_name, backup_id))

    async def resolve_key_for_backup(
        self, caller: Principal, backup_id: str, recovery: BackupKeyReference | None
    ) -> DataKey:
        """A coroutine, as `get_active_key`; a recovery (rare) runs on a thread."""
        try:
            return await self._in_next_batch(*_resolve_request(caller, backup_id, recovery))
        except _NeedsRecovery:
            assert recovery is not None
            return await asyncio.to_thread(self._recovery.recover, caller, backup_id, recovery)

    # The batch

    async def _in_next_batch(self, request: _DataKeyRequest, check: Callable[[], None]) -> DataKey:
        """Checks the caller and the input here, then lets the group committer do the rest."""
        try:
            check()
        except KmsError as error:
            # Its own transaction: on a thread, so the event loop serves other calls meanwhile.
            await asyncio.to_thread(self._audit_refusal, request, error)
            raise
        await self._committer.submit(request)
        return _outcome(request)

    def _audit_refusal(self, request: _DataKeyRequest, error: KmsError) -> None:
        audit = AuditContext(key_name=request.key_name, backup_id=request.backup_id)
        self._tx.audit_denial(request.actor, request.action, audit, error)

    def _run_batch(self, requests: Sequence[_DataKeyRequest]) -> None:
        """One transaction for a batch of GetActiveKey / ResolveKeyForBackup calls.

        Every call's binding and audit event (allowed or denied) commit together;
        a call's outcome is published only after the commit.
        """
        # Keys that could not be rotated to make room: their GetActiveKeys get this error.
        no_room: dict[str, KmsError] = {}
        attempt = rotations = 1
        while True:
            try:
                with driver_transaction(self._tx.engine) as statements:
                    store = DataKeyStore(statements, self._tx.integrity)
                    decided = self._decide(store, requests, no_room)
                    store.add_bindings(decided.bindings)
                    self._append_events_and_counts(store, decided)
                return
            except _NeedsRoom as needs:
                # Rolled back: rotate, then decide again. A key still without room after a
                # few rounds (a bug, or replicas racing without end) is refused, not looped on.
                self._rotate_to_make_room(needs.demand, no_room, give_up=rotations == MAX_ATTEMPTS)
                rotations += 1
                continue
            except _StaleRead:
                if attempt < MAX_ATTEMPTS:
                    attempt += 1
                    continue
                failure: BaseException = Aborted(
                    "CONCURRENT_CHANGE",
                    "the key version changed while the call ran, so nothing was done; retry",
                )
            except AuditWriteFailed as failed:
                if attempt < MAX_ATTEMPTS and is_transient(failed.cause):
                    back_off(attempt)
                    attempt += 1
                    continue
                failure = self._tx.audit_unavailable(failed.cause)
            except DATABASE_ERRORS as error:
                if attempt < MAX_ATTEMPTS and is_transient(error):
                    back_off(attempt)
                    attempt += 1
                    continue
                failure = self._tx.unavailable(error)
            except Exception as error:  # a bug: fail every call of the batch, loudly
                log.exception("data-key batch failed")
                failure = error
            # Rolled back: no call of the batch changed anything.
            for request in requests:
                request.outcome = failure
            return

    def _rotate_to_make_room(
        self, demand: Mapping[str, int], no_room: dict[str, KmsError], *, give_up: bool
    ) -> None:
        for key_name, count in demand.items():
            try:
                if give_up:
                    raise Unavailable(
                        "KEY_ROTATION_PENDING",
                        f"key {key_name} is being rotated before its active version reaches "
                        f"{self._max_wrapped} data keys; retry",
                    )
                self._make_room(key_name, count)
            except KmsError as error:
                log.error(
                    "%s was not rotated to keep its active version below %d data keys: %s (%s)",
                    key_name,
                    self._max_wrapped,
                    error.message,
                    error.reason,
                )
                no_room[key_name] = error

    def _append_events_and_counts(self, store: DataKeyStore, decided: _Decided) -> None:
        """Appends the batch's audit events, and adds what each version wrapped to its count,
        read again under its row lock (taken before the audit head's, as every writer does)."""
        locked: dict[tuple[str, int], VersionFacts] = {}
        for identity in sorted(decided.wrapped):  # one order for every batch: no deadlock
            used = decided.versions[identity]
            facts = store.lock_version(*identity, used.facts)
            if facts is None or (facts.state, facts.wrapped_material) != (
                used.state,
                used.wrapped_material,
            ):
                raise _StaleRead()  # changed since the batch read it: decide again
            events = decided.wrapped[identity]
            if facts.data_keys_wrapped + len(events) > self._max_wrapped:
                raise _NeedsRoom({identity[0]: len(events)})
            for count, event in enumerate(events, facts.data_keys_wrapped + 1):
                event["detail"] = f"data_keys_wrapped={count}"
            locked[identity] = facts
        try:
            sequences = store.append_audit_events(decided.events)
        except AUDIT_WRITE_ERRORS as error:
            raise AuditWriteFailed(error) from None
        sequence_of = {
            id(event): sequence for event, sequence in zip(decided.events, sequences, strict=True)
        }
        for identity, facts in locked.items():
            last = sequence_of[id(decided.wrapped[identity][-1])]
            store.count_wrapped(*identity, facts, len(decided.wrapped[identity]), last)

    def _decide(
        self,
        store: DataKeyStore,
        requests: Sequence[_DataKeyRequest],
        no_room: Mapping[str, KmsError],
    ) -> _Decided:
        """Sets each request's outcome; returns the new binding rows and the audit events.
        Raises `_NeedsRoom` when an active version cannot wrap all the keys asked of it."""
        versions: dict[tuple[str, int], _Version] = {}
        bindings: dict[str, _Binding] = {}
        for row in store.bindings_by_backup_id({r.backup_id for r in requests}):
            bindings[row.backup_id] = _Binding(
                row.key_name,
                row.version,
                row.wrapped_data_key,
                row.created_by,
                row.created_us,
                stored=(row.sealed(), row.mac),
            )
            if (row.key_name, row.version) not in versions:
                versions[(row.key_name, row.version)] = self._checked_version(
                    row.key_name, row.version, row.facts
                )
        issuing = {r.key_name for r in requests if r.action is Action.ISSUE_DATA_KEY}
        # A key whose row fails its MAC maps to that failure: none of its calls is served.
        actives: dict[str, int | IntegrityFailure | None] = {}
        seal = self._tx.integrity.state
        for active in store.active_versions(issuing) if issuing else ():
            try:
                seal.check(active.sealed(), active.mac)
            except IntegrityFailure as failure:
                actives[active.name] = failure
                continue
            actives[active.name] = active.active_version
            if active.active_version is not None and active.facts is not None:
                versions[(active.name, active.active_version)] = self._checked_version(
                    active.name, active.active_version, active.facts
                )
        self._check_room(requests, bindings, actives, versions, no_room)

        new_bindings: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        wrapped: dict[tuple[str, int], list[dict[str, Any]]] = {}
        now = now_us()
        for request in requests:
            audit = AuditContext(key_name=request.key_name, backup_id=request.backup_id)
            wrapped_under: tuple[str, int] | None = None  # a new data key: the version's count
            try:
                if request.action is Action.ISSUE_DATA_KEY:
                    creates_binding = request.backup_id not in bindings
                    if creates_binding and request.key_name in no_room:
                        raise no_room[request.key_name]
                    issued = self._issue(request, bindings, actives, versions, audit, now)
                    if creates_binding:
                        new_bindings.append(_binding_row(issued, request.actor, now))
                        wrapped_under = (issued.key_name, issued.version)
                    request.outcome = issued
                else:
                    request.outcome = self._resolve(request, bindings, versions, audit)
                fields = vars(audit).copy()  # checked input: stored as it is
                outcome, status = Outcome.ALLOWED, "OK"
            except _NeedsRecovery as needs:
                request.outcome = needs  # audited by the recovery transaction instead
                continue
            except KmsError as error:
                request.outcome = error
                fields = storable({**vars(audit), "detail": error.audit_detail})
                outcome, status = Outcome.DENIED, error.audit_status
            fields.update(
                time_us=now,
                actor=request.actor,
                action=request.action,
                outcome=outcome,
                status_code=status,
            )
            events.append(fields)
            if wrapped_under is not None:
                wrapped.setdefault(wrapped_under, []).append(fields)
        return _Decided(new_bindings, events, wrapped, versions)

    def _check_room(
        self,
        requests: Sequence[_DataKeyRequest],
        bindings: Mapping[str, _Binding],
        actives: Mapping[str, int | IntegrityFailure | None],
        versions: Mapping[tuple[str, int], _Version],
        no_room: Mapping[str, KmsError],
    ) -> None:
        """Raises `_NeedsRoom` for the keys whose active version would pass the bound in this
        batch (counting every new backup id asked for: an upper bound)."""
        demand: dict[str, int] = {}
        for request in requests:
            if request.action is Action.ISSUE_DATA_KEY and request.backup_id not in bindings:
                demand[request.key_name] = demand.get(request.key_name, 0) + 1
        short: dict[str, int] = {}
        for key_name, count in demand.items():
            version = actives.get(key_name)
            if key_name in no_room or not isinstance(version, int):
                continue
            active = versions[(key_name, version)]
            if active.data_keys_wrapped + count > self._max_wrapped:
                short[key_name] = count
        if short:
            raise _NeedsRoom(short)

    def _checked_version(self, key_name: str, version: int, facts: VersionFacts) -> _Version:
        """The hot path's view of a version row, carrying its MAC check's failure if any."""
        failure = None
        try:
            self._tx.integrity.state.check(facts.sealed(key_name, version), facts.mac)
        except IntegrityFailure as error:
            failure = error
        return _Version(
            key_name,
            version,
            facts.state,
            facts.wrapped_material,
            facts,
            failure,
            facts.destroy_due_us,
            facts.data_keys_wrapped,
        )

    def _issue(
        self,
        request: _DataKeyRequest,
        bindings: dict[str, _Binding],
        actives: dict[str, int | IntegrityFailure | None],
        versions: Mapping[tuple[str, int], _Version],
        audit: AuditContext,
        now: int,
    ) -> DataKey:
        key_name, backup_id = request.key_name, request.backup_id
        binding = bindings.get(backup_id)
        if binding is not None:
            # A retry gets the data key again; nothing else does (see the module's doc).
            cause = _not_a_retry(binding, request, now, self._retry_window_us)
            if cause:
                raise AlreadyExists(
                    "BACKUP_ID_IN_USE",
                    f"backup id {backup_id} is already in use; a new backup needs a new backup id",
                    audit_detail=f"backup id {backup_id} is already in use: {cause}",
                )
            if binding.stored is not None:
                # Who made the binding decides this hand-out: it must be what the server wrote.
                self._tx.integrity.state.check(*binding.stored)
            audit.version = binding.version
            audit.detail = "repeated request: returned the existing binding"
            return self._unwrap_bound(backup_id, binding, versions)
        if key_name not in actives:
            raise NotFound("KEY_NOT_FOUND", f"key {key_name} does not exist")
        version = actives[key_name]
        if isinstance(version, IntegrityFailure):
            raise version
        if version is None:
            raise FailedPrecondition(
                "NO_ACTIVE_VERSION",
                f"key {key_name} has no active version; activate one with: "
                f"kmsctl rotate {key_name} VERSION",
            )
        audit.version = version
        active = versions[(key_name, version)]
        if active.integrity_failure is not None:
            raise active.integrity_failure
        material = self._materials.of(active)
        data_key = crypto.new_key_material()
        wrapped = crypto.wrap_data_key(material, backup_id, key_name, version, data_key)
        # Later requests of the same batch for this backup id see this binding.
        bindings[backup_id] = _Binding(key_name, version, wrapped, request.actor, now)
        return DataKey(backup_id, key_name, version, data_key, wrapped)

    def _resolve(
        self,
        request: _DataKeyRequest,
        bindings: dict[str, _Binding],
        versions: Mapping[tuple[str, int], _Version],
        audit: AuditContext,
    ) -> DataKey:
        binding = bindings.get(request.backup_id)
        if binding is None:
            if request.recovery is not None:
                raise _NeedsRecovery()
            raise guards.unknown_backup(request.backup_id)
        audit.key_name, audit.version = binding.key_name, binding.version
        if not request.scope.allows(binding.key_name):
            if request.recovery is not None:
                raise _NeedsRecovery()  # answered as the recovery of an unknown backup is
            raise guards.unknown_backup(
                request.backup_id, guards.out_of_scope(request.actor, binding.key_name)
            )
        return self._unwrap_bound(request.backup_id, binding, versions)

    def _unwrap_bound(
        self,
        backup_id: str,
        binding: _Binding,
        versions: Mapping[tuple[str, int], _Version],
    ) -> DataKey:
        row = versions.get((binding.key_name, binding.version))
        if row is None:
            raise IntegrityFailure(
                "BINDING_WITHOUT_VERSION",
                f"{binding.key_name} version {binding.version} is missing",
            )
        if row.integrity_failure is not None:
            raise row.integrity_failure
        data_key = crypto.unwrap_data_key(
            self._materials.of(row),
            backup_id,
            binding.key_name,
            binding.version,
            binding.wrapped_data_key,
        )
        return DataKey(
            backup_id, binding.key_name, binding.version, data_key, binding.wrapped_data_key
        )


@dataclass(frozen=True)
class _Version:
    key_name: str
    version: int
    state: str
    wrapped_material: bytes | None
    facts: VersionFacts  # as read, with its MAC
    integrity_failure: IntegrityFailure | None = None  # the row failed its MAC check
    destroy_due_us: int | None = None
    data_keys_wrapped: int = 0  # as read at the batch's start


@dataclass
class _Decided:
    """What a batch decided: rows to insert, events to append, and per version the events of
    the data keys it wrapped (each gets the count after it)."""

    bindings: list[dict[str, Any]]
    events: list[dict[str, Any]]
    wrapped: dict[tuple[str, int], list[dict[str, Any]]]
    versions: Mapping[tuple[str, int], _Version]


class _NeedsRoom(Exception):
    """Active versions that cannot wrap this many more data keys: rotate their keys first."""

    def __init__(self, demand: Mapping[str, int]) -> None:
        super().__init__("rotation needed")
        self.demand = demand


class _StaleRead(Exception):
    """A version changed between the batch's read and its lock (another replica or call)."""


@dataclass(frozen=True)
class _Binding:
    key_name: str
    version: int
    wrapped_data_key: bytes
    created_by: str  # the principal whose GetActiveKey made it
    created_us: int
    # As read, with its MAC: checked before created_by grants a retry. None when the
    # binding was made in this batch.
    stored: tuple[SealedBinding, str | None] | None = None


@dataclass
class _DataKeyRequest:
    """One GetActiveKey or ResolveKeyForBackup call waiting for its batch."""

    actor: str
    action: Action
    backup_id: str
    key_name: str
    recovery: BackupKeyReference | None = None
    # The keys a restore may resolve backups of (its restore grants).
    scope: KeyScope = EVERY_KEY
    # Set by the batch: the data key, or the error to raise in the caller's thread.
    outcome: DataKey | BaseException | None = None


def _issue_request(
    caller: Principal, key_name: str, backup_id: str
) -> tuple[_DataKeyRequest, Callable[[], None]]:
    """A GetActiveKey call's request for the batch, and the checks it must pass first."""

    def check() -> None:
        guards.require(caller, Role.BACKUP)
        model.check_key_name(key_name)
        guards.require_key(caller, Role.BACKUP, key_name)
        model.check_backup_id(backup_id)

    return _DataKeyRequest(caller.name, Action.ISSUE_DATA_KEY, backup_id, key_name), check


def _resolve_request(
    caller: Principal, backup_id: str, recovery: BackupKeyReference | None
) -> tuple[_DataKeyRequest, Callable[[], None]]:
    """A ResolveKeyForBackup call's request for the batch, and the checks it must pass first."""

    def check() -> None:
        guards.require(caller, Role.RESTORE)
        model.check_backup_id(backup_id)

    request = _DataKeyRequest(
        caller.name, Action.RESOLVE_DATA_KEY, backup_id, "", recovery, caller.scope(Role.RESTORE)
    )
    return request, check


def _outcome(request: _DataKeyRequest) -> DataKey:
    """What the batch decided for the request: its data key, or the error it raises."""
    if request.outcome is None:
        raise RuntimeError("the group committer returned no outcome")
    if isinstance(request.outcome, BaseException):
        raise request.outcome
    return request.outcome


class _NeedsRecovery(Exception):
    """No binding, but the caller offered the archive header: recover off the batch."""


def _binding_row(key: DataKey, created_by: str, created_us: int) -> dict[str, Any]:
    return {
        "backup_id": key.backup_id,
        "key_name": key.key_name,
        "version": key.version,
        "wrapped_data_key": key.wrapped,
        "created_us": created_us,
        "recovered": False,
        "created_by": created_by,
    }


def _not_a_retry(binding: _Binding, request: _DataKeyRequest, now: int, window_us: int) -> str:
    """Why a GetActiveKey for a bound backup id is not the same caller's retry ("" if it is)."""
    if binding.key_name != request.key_name:
        # Unnamed: this event is about the caller's key, which the other key's auditors
        # may not be entitled to, nor this key's auditors to the other.
        return "bound to another key"
    if binding.created_by != request.actor:
        return f"bound for principal {binding.created_by or '(unknown)'}"
    if now - binding.created_us > window_us:
        return f"bound {(now - binding.created_us) // 1_000_000} s ago, beyond the retry window"
    return ""
