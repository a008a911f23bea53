"""The use cases of the key-management service, one database transaction each.

Every use case checks the caller's role first (permission before existence),
then does its work and appends its audit event in the same transaction, so a
state change and its audit record commit together or not at all. A refused
call is rolled back and then audited as denied in a transaction of its own.

GetActiveKey and ResolveKeyForBackup, the calls backups make all day, go
through group commit instead: concurrent calls share one transaction (each
call's binding and audit event, allowed or denied, in it) and are answered
once it has committed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from server import crypto, root_keys, server_keys
from server.audit_file import AuditSinkError
from server.db.driver import driver_transaction
from server.db.engine import make_sessionmaker, read_snapshot_options, truncate_sqlite_wal
from server.db.models import BackupBindingRow, KeyRow, KeyVersionRow
from server.db.repository import (
    DataKeyStore,
    Integrity,
    MetaStore,
    Repository,
    VersionFacts,
    audit_event_from_row,
    sealed_key,
    sealed_version,
)
from server.domain import model
from server.domain.audit_chain import verify_chain
from server.domain.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    IntegrityFailure,
    InvalidArgument,
    KmsError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from server.domain.integrity import SealedBinding
from server.domain.model import (
    EVERY_KEY,
    Action,
    AuditCheckpoint,
    AuditEvent,
    AuditVerification,
    DataKey,
    KeyInfo,
    KeyScope,
    KeyVersionInfo,
    Outcome,
    Principal,
    Role,
    Rotation,
    VersionOrigin,
    VersionState,
)
from server.domain.state_replay import StateReplay, StoredRow
from server.group_commit import GroupCommitter
from server.material_cache import DEFAULT_MAX_AGE_SECONDS, MaterialCache
from server.server_keys import AuditSink, ServerKeys

log = logging.getLogger(__name__)

T = TypeVar("T")

ROOT_KEY_CHECK = "root_key_check"
# PostgreSQL SQLSTATEs worth retrying: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = {"40001", "40P01"}
UNIQUE_VIOLATION = "23505"
MAX_ATTEMPTS = 5
DEFAULT_RETRY_WINDOW_SECONDS = 15 * 60
# What the database layer raises when it fails or cannot be reached. A pool
# timeout (sqlalchemy.exc.TimeoutError) is not a DBAPIError but is an outage too.
DATABASE_ERRORS = (sa_exc.DBAPIError, sa_exc.TimeoutError)
# What writing an audit event can raise: the database's errors, and the audit file's.
AUDIT_WRITE_ERRORS = (*DATABASE_ERRORS, AuditSinkError)


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class AuditContext:
    """What the audit event of a call says about its subject; filled in as the call learns it."""

    key_name: str = ""
    version: int = 0
    from_version: int = 0
    to_version: int = 0
    backup_id: str = ""
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True)
class BackupKeyReference:
    """What an archive header says about its key, offered for binding recovery."""

    key_name: str
    version: int
    wrapped_data_key: bytes


class KeyManagementService:
    def __init__(
        self,
        engine: Engine,
        root_key: crypto.RootKeyring | crypto.RootKey,
        *,
        on_unavailable: Callable[[], None] | None = None,
        audit_sink: AuditSink | None = None,
        material_cache_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        data_key_retry_window_seconds: float = DEFAULT_RETRY_WINDOW_SECONDS,
        destroy_delay_seconds: float = 0.0,
        destroy_approvals: Callable[[], int] = lambda: 1,
        min_rotation_seconds: int = 3600,
    ) -> None:
        self._engine = engine
        # How long the principal that made a binding may get its data key again (a retry).
        self._retry_window_us = int(data_key_retry_window_seconds * 1_000_000)
        self._sessions = make_sessionmaker(engine)
        # A lone RootKey is a keyring of one (tests, tools).
        self._root_key = crypto.as_keyring(root_key)
        # Told when a call fails because the database is unreachable (the health probe).
        self._on_unavailable = on_unavailable
        self._audit_sink = audit_sink
        self._keys: ServerKeys | None = None
        self._integrity_parts: Integrity | None = None
        self._materials = MaterialCache(material_cache_seconds)
        self._materials.start_sweeping()
        self._committer = GroupCommitter(self._run_data_key_batch)
        from server.usecases.lifecycle import Lifecycle  # it uses this module's helpers

        self.lifecycle = Lifecycle(
            self, destroy_delay_seconds, destroy_approvals, min_rotation_seconds
        )

    def close(self) -> None:
        """Stops the scheduler and the group committer once in-flight calls are done, then
        wipes cached material."""
        self.lifecycle.stop()
        self._committer.stop()
        self._materials.close()

    # Start-up

    def check_root_key(self) -> None:
        """Records the root key's check value on first start and refuses a different root key
        later; then unwraps the server's audit and state keys, making them on first start."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self._sessions.begin() as session:
                    self._open_server_keys(session)
                return
            except sa_exc.IntegrityError:
                # Another replica made the keys at the same moment: use its.
                if attempt == MAX_ATTEMPTS:
                    raise

    def _open_server_keys(self, session: Session) -> None:
        bootstrap = MetaStore(session)
        recorded = root_keys.check_keyring(session, self._root_key)
        try:
            keys = server_keys.load(bootstrap, self._root_key)
        except server_keys.ServerKeysError as error:
            raise crypto.RootKeyError(str(error)) from None
        if keys is None:
            if bootstrap.any_keyed_audit_event():
                raise crypto.RootKeyError(
                    "the server's audit keys are missing from a database whose audit log is "
                    "keyed: they were deleted; restore the database from a backup"
                )
            keys = server_keys.create(bootstrap, self._root_key, bootstrap.audit_head().sequence)
            repo = Repository(session, keys.integrity(self._audit_sink))
            server_keys.start_keyed_chain(repo, keys, now_us())
        elif recorded:  # a new root key's check value: audited like any change
            root_keys.audit_recorded(Repository(session, keys.integrity(self._audit_sink)),
                                     recorded, now_us())  # fmt: skip
        self._keys = keys
        self._integrity_parts = keys.integrity(self._audit_sink)

    @property
    def _integrity(self) -> Integrity:
        if self._integrity_parts is None:
            raise RuntimeError("check_root_key() must run before the service is used")
        return self._integrity_parts

    @property
    def server_keys(self) -> ServerKeys:
        if self._keys is None:
            raise RuntimeError("check_root_key() must run before the service is used")
        return self._keys

    # Use cases

    def register_key_version(
        self,
        caller: Principal,
        key_name: str,
        imported_material: bytes,
        activate_first_version: bool,
    ) -> KeyVersionInfo:
        audit = AuditContext(key_name=key_name)

        def work(repo: Repository) -> KeyVersionInfo:
            _require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            _require_key(caller, Role.ADMIN, key_name)
            if imported_material and len(imported_material) != model.KEY_MATERIAL_BYTES:
                raise InvalidArgument(
                    "MATERIAL_LENGTH",
                    f"imported_material must be exactly {model.KEY_MATERIAL_BYTES} bytes, "
                    f"not {len(imported_material)}",
                )
            created = now_us()
            key = repo.get_key(key_name, for_update=True) or repo.add_key(key_name, created)
            version = key.last_version + 1
            audit.version = version
            if activate_first_version and version != 1:
                raise FailedPrecondition(
                    "ACTIVATE_ONLY_FIRST_VERSION",
                    f"activate_first_version applies only to a key's first version; key "
                    f"{key_name} already has versions: register it without --activate, then "
                    f"make it active with: kmsctl rotate {key_name} {version}",
                )
            origin = VersionOrigin.IMPORTED if imported_material else VersionOrigin.GENERATED
            material = (
                bytearray(imported_material) if imported_material else crypto.new_secret_buffer()
            )
            try:
                wrapped = self._root_key.wrap_version_material(key_name, version, material)
            finally:
                crypto.wipe(material)
            row = KeyVersionRow(
                key_name=key_name,
                version=version,
                state=VersionState.ENABLED,
                origin=origin,
                wrapped_material=wrapped,
                created_us=created,
                destroyed_us=None,
            )
            repo.add_version(row)
            key.last_version = version
            if activate_first_version:
                key.active_version = version
                audit.to_version = version
            audit.detail = f"origin={origin}" + (", activated" if activate_first_version else "")
            repo.flush()
            return _version_info(row, key.active_version)

        return self._run(caller.name, Action.REGISTER_VERSION, audit, work)

    def rotate_active(
        self,
        caller: Principal,
        key_name: str,
        to_version: int,
        expected_active_version: int | None,
        reason: str,
    ) -> Rotation:
        audit = AuditContext(key_name=key_name, to_version=to_version, reason=reason[:1024])

        def work(repo: Repository) -> Rotation:
            _require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            _require_key(caller, Role.ADMIN, key_name)
            model.check_version(to_version, "to_version")
            model.check_reason(reason)
            key = _existing_key(repo, key_name, for_update=True)
            current = key.active_version or 0
            audit.from_version = current
            target = repo.get_version(key_name, to_version, for_update=True)
            if target is None:
                raise NotFound(
                    "KEY_VERSION_NOT_FOUND", f"key {key_name} has no version {to_version}"
                )
            if expected_active_version is not None and expected_active_version != current:
                raise Aborted(
                    "ACTIVE_VERSION_CHANGED",
                    f"the active version of {key_name} is {current}, not the expected "
                    f"{expected_active_version}; nothing was changed",
                )
            _require_usable(target, f"cannot make {key_name} version {to_version} active")
            if current == to_version:
                raise FailedPrecondition(
                    "ALREADY_ACTIVE", f"{key_name} version {to_version} is already active"
                )
            key.active_version = to_version
            rotated = now_us()
            sequence = _append_audit(
                repo,
                time_us=rotated,
                actor=caller.name,
                action=Action.ROTATE,
                outcome=Outcome.ALLOWED,
                status_code="OK",
                **asdict(audit),
            )
            return Rotation(current or None, to_version, rotated, sequence)

        return self._run(caller.name, Action.ROTATE, audit, work, audit_on_success=False)

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
            return await asyncio.to_thread(self._recover, caller, backup_id, recovery)

    def _recover(self, caller: Principal, backup_id: str, recovery: BackupKeyReference) -> DataKey:
        """ResolveKeyForBackup when the database has no binding for the backup (rare: unbatched)."""
        audit = AuditContext(backup_id=backup_id)
        action = Action.RECOVER_BINDING

        def work(repo: Repository) -> DataKey:
            nonlocal action
            binding = repo.get_binding(backup_id)
            if binding is None:
                return self._recover_binding(caller, repo, backup_id, recovery, audit)
            # Recovered by a concurrent call meanwhile: an ordinary resolve now.
            action = Action.RESOLVE_DATA_KEY
            audit.key_name, audit.version = binding.key_name, binding.version
            if not caller.scope(Role.RESTORE).allows(binding.key_name):
                # Answered as a backup without a binding would be, header and all.
                action = Action.RECOVER_BINDING
                cause = _out_of_scope(caller.name, binding.key_name)
                try:
                    self._check_recovery(caller, repo, backup_id, recovery, AuditContext())
                except KmsError as error:
                    raise _concealed(error, cause) from None
                raise _concealed(_unknown_backup(backup_id), cause)
            return self._data_key_from_binding(repo, binding)

        return self._run(caller.name, action, audit, work, action_of=lambda: action)

    def get_key_version(self, caller: Principal, key_name: str, version: int) -> KeyVersionInfo:
        audit = AuditContext(key_name=key_name, version=version)

        def work(repo: Repository) -> KeyVersionInfo:
            _require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            _require_key(caller, Role.ADMIN, key_name)
            model.check_version(version)
            key = _existing_key(repo, key_name)
            row = _existing_version(repo, key_name, version)
            return _version_info(row, key.active_version, repo.backup_count(key_name, version))

        return self._run(caller.name, Action.GET_VERSION, audit, work)

    def list_key_versions(self, caller: Principal, key_name: str) -> list[KeyVersionInfo]:
        audit = AuditContext(key_name=key_name)

        def work(repo: Repository) -> list[KeyVersionInfo]:
            _require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            _require_key(caller, Role.ADMIN, key_name)
            key = _existing_key(repo, key_name)
            counts = repo.backup_counts(key_name)
            return [
                _version_info(row, key.active_version, counts.get(row.version, 0))
                for row in repo.list_versions(key_name)
            ]

        return self._run(caller.name, Action.LIST_VERSIONS, audit, work)

    def list_keys(
        self, caller: Principal, page_size: int, page_token: str
    ) -> tuple[list[KeyInfo], str]:
        def work(repo: Repository) -> tuple[list[KeyInfo], str]:
            _require(caller, Role.ADMIN)
            limit = model.check_page_size(page_size)
            after = _decode_name_token(page_token)
            scope = caller.scope(Role.ADMIN)
            rows, last, more = _scoped_page(
                repo.list_keys,
                lambda row: scope.allows(row[0].name),
                lambda row: str(row[0].name),
                after,
                limit,
                scope.everything,
            )
            keys = [
                KeyInfo(
                    row.name,
                    row.active_version,
                    count,
                    row.created_us,
                    row.rotation_period_us,
                    row.next_rotation_us,
                )
                for row, count in rows
            ]
            return keys, last.encode().hex() if more else ""

        return self._run(caller.name, Action.LIST_KEYS, AuditContext(), work)

    def disable_key_version(
        self, caller: Principal, key_name: str, version: int, reason: str
    ) -> KeyVersionInfo:
        def change(row: KeyVersionRow, active: int | None) -> None:
            if row.state == VersionState.DISABLED:
                raise FailedPrecondition(
                    "ALREADY_DISABLED", f"{key_name} version {version} is already disabled"
                )
            _refuse_if_active_or_destroyed(row, active, "disable")
            row.state = VersionState.DISABLED

        return self._change_version(
            caller, Action.DISABLE_VERSION, key_name, version, reason, change
        )

    def enable_key_version(
        self, caller: Principal, key_name: str, version: int, reason: str
    ) -> KeyVersionInfo:
        def change(row: KeyVersionRow, active: int | None) -> None:
            if row.state == VersionState.DESTROYED:
                raise FailedPrecondition(
                    "KEY_VERSION_DESTROYED",
                    f"{key_name} version {version} is destroyed and cannot be enabled again",
                )
            if row.state == VersionState.ENABLED:
                raise FailedPrecondition(
                    "ALREADY_ENABLED", f"{key_name} version {version} is already enabled"
                )
            _refuse_if_scheduled(row, "enable")
            row.state = VersionState.ENABLED

        return self._change_version(
            caller, Action.ENABLE_VERSION, key_name, version, reason, change
        )

    def destroy_key_version(
        self,
        caller: Principal,
        key_name: str,
        version: int,
        reason: str,
        *,
        validate_only: bool = False,
    ) -> KeyVersionInfo:
        """Schedules the destruction (server.usecases.lifecycle); the scheduler carries it out."""
        return self.lifecycle.schedule_destruction(
            caller, key_name, version, reason, validate_only=validate_only
        )

    def _forget_destroyed(self, key_name: str, version: int) -> None:
        """After a destroy commits: no copy of the material in this process's cache, and on
        SQLite none in the write-ahead log (other replicas' caches expire on their own)."""
        self._materials.evict(key_name, version)
        if self._engine.dialect.name == "sqlite":
            try:
                done = truncate_sqlite_wal(self._engine)
            except DATABASE_ERRORS as error:
                log.warning("could not truncate the SQLite WAL after a destroy: %s", error)
                return
            if not done:
                log.warning(
                    "the SQLite WAL could not be truncated after destroying %s version %d "
                    "(readers kept it busy); it will be at the next checkpoint",
                    key_name,
                    version,
                )

    def list_audit_events(
        self, caller: Principal, page_size: int, page_token: str, key_name: str
    ) -> tuple[list[AuditEvent], str]:
        audit = AuditContext(key_name=key_name)

        def work(repo: Repository) -> tuple[list[AuditEvent], str]:
            _require(caller, Role.AUDITOR)
            scope = caller.scope(Role.AUDITOR)
            if key_name:
                model.check_key_name(key_name)
                _require_key(caller, Role.AUDITOR, key_name)
            limit = model.check_page_size(page_size)
            after = model.check_page_token(page_token)
            # Events about no key (denials before a key was named, verifications) are
            # for auditors of every key only.
            rows, last, more = _scoped_page(
                lambda start, count: repo.list_audit(start, count, key_name),
                lambda row: bool(row.key_name) and scope.allows(row.key_name),
                lambda row: int(row.sequence),
                after,
                limit,
                scope.everything or bool(key_name),
            )
            events = [audit_event_from_row(row) for row in rows]
            return events, str(last) if more else ""

        return self._run(caller.name, Action.LIST_AUDIT, audit, work)

    def verify_audit_log(self, caller: Principal) -> AuditVerification:
        audit = AuditContext()
        try:
            _require_whole_log(caller, "verifying")
        except KmsError as error:
            self._audit_denial(caller.name, Action.VERIFY_AUDIT, audit, error)
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
        return self._run(caller.name, Action.VERIFY_AUDIT, audit, lambda repo: result)

    def _verify_in_snapshot(self) -> AuditVerification:
        """The chain with its MACs, then the stored state against what the log says."""
        keys = self.server_keys
        try:
            with self._sessions() as session:
                dialect = session.get_bind().dialect.name
                session.connection(execution_options=read_snapshot_options(dialect))
                repo = Repository(session, self._integrity)
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
            raise self._unavailable(error) from None
        if problem:
            return dataclasses.replace(chain, intact=False, problem=f"state: {problem}")
        return chain

    def audit_checkpoint(self, caller: Principal, sequence: int) -> AuditCheckpoint:
        """The server's signature over an event's chain hash (the head's when `sequence` is 0),
        given only after that event's (or the head's) MAC checks."""
        audit = AuditContext(detail=f"event {sequence}" if sequence else "head")

        def work(repo: Repository) -> AuditCheckpoint:
            _require_whole_log(caller, "checkpointing")
            if not 0 <= sequence <= model.MAX_SEQUENCE:
                raise InvalidArgument("SEQUENCE_OUT_OF_RANGE", "sequence is out of range")
            keys = self.server_keys
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

        return self._run(caller.name, Action.CHECKPOINT_AUDIT, audit, work)

    def audit_public_key(self, caller: Principal) -> tuple[str, str]:
        """The audit signing key's public half (PEM) and its key id."""

        def work(repo: Repository) -> tuple[str, str]:
            _require(caller, Role.AUDITOR)
            return self.server_keys.public_key_pem(), self.server_keys.key_id

        return self._run(caller.name, Action.READ_AUDIT_PUBLIC_KEY, AuditContext(), work)

    def record_denial(self, actor: str, action: Action, error: KmsError) -> None:
        """Audits a call refused before it reached a use case (for example unauthenticated)."""
        self._audit_denial(actor, action, AuditContext(), error)

    # Shared steps

    def _change_version(
        self,
        caller: Principal,
        action: Action,
        key_name: str,
        version: int,
        reason: str,
        change: Callable[[KeyVersionRow, int | None], None],
    ) -> KeyVersionInfo:
        audit = AuditContext(key_name=key_name, version=version, reason=reason[:1024])

        def work(repo: Repository) -> KeyVersionInfo:
            _require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            _require_key(caller, Role.ADMIN, key_name)
            model.check_version(version)
            model.check_reason(reason)
            # Lock the key first: a concurrent rotation cannot make this version active meanwhile.
            key = _existing_key(repo, key_name, for_update=True)
            row = repo.get_version(key_name, version, for_update=True)
            if row is None:
                raise NotFound("KEY_VERSION_NOT_FOUND", f"key {key_name} has no version {version}")
            change(row, key.active_version)
            repo.flush()
            return _version_info(row, key.active_version)

        return self._run(caller.name, action, audit, work)

    def _usable_material(self, repo: Repository, key_name: str, version: int) -> bytearray:
        row = repo.get_version(key_name, version)
        if row is None:
            raise IntegrityFailure(
                "BINDING_WITHOUT_VERSION", f"{key_name} version {version} is missing"
            )
        return self._material(row)

    def _material(self, row: _VersionLike) -> bytearray:
        """A usable version's unwrapped material, from the cache when its wrapped blob is known
        (see server.material_cache for why that is safe)."""
        _require_usable(row, f"{row.key_name} version {row.version} cannot be used")
        assert row.wrapped_material is not None
        material = self._materials.get(row.key_name, row.version, row.wrapped_material)
        if material is None:
            material = self._root_key.unwrap_version_material(
                row.key_name, row.version, row.wrapped_material
            )
            self._materials.put(row.key_name, row.version, row.wrapped_material, material)
        return material

    def _data_key_from_binding(self, repo: Repository, binding: BackupBindingRow) -> DataKey:
        material = self._usable_material(repo, binding.key_name, binding.version)
        data_key = crypto.unwrap_data_key(
            material,
            binding.backup_id,
            binding.key_name,
            binding.version,
            binding.wrapped_data_key,
        )
        return DataKey(
            binding.backup_id,
            binding.key_name,
            binding.version,
            data_key,
            binding.wrapped_data_key,
        )

    def _recover_binding(
        self,
        caller: Principal,
        repo: Repository,
        backup_id: str,
        ref: BackupKeyReference,
        audit: AuditContext,
    ) -> DataKey:
        """Re-creates a lost binding from an archive header (database restored from a snapshot)."""
        data_key = self._check_recovery(caller, repo, backup_id, ref, audit)
        repo.add_binding(
            BackupBindingRow(
                backup_id=backup_id,
                key_name=ref.key_name,
                version=ref.version,
                wrapped_data_key=ref.wrapped_data_key,
                created_us=now_us(),
                recovered=True,
                created_by=caller.name,
            )
        )
        audit.detail = "binding recovered from the archive header"
        return DataKey(
            backup_id, ref.key_name, ref.version, data_key, ref.wrapped_data_key, recovered=True
        )

    def _check_recovery(
        self,
        caller: Principal,
        repo: Repository,
        backup_id: str,
        ref: BackupKeyReference,
        audit: AuditContext,
    ) -> bytes:
        """The data key an archive header's reference unwraps to, or the refusal it gets."""
        model.check_key_name(ref.key_name)
        model.check_version(ref.version)
        audit.key_name, audit.version = ref.key_name, ref.version
        missing = (
            f"no key is bound to backup {backup_id}, and the key version its header names "
            f"({ref.key_name} version {ref.version}) does not exist"
        )
        # Out of scope: the answer a header naming a version that does not exist gets.
        if not caller.scope(Role.RESTORE).allows(ref.key_name):
            raise NotFound(
                "BACKUP_NOT_FOUND",
                missing,
                audit_status="PERMISSION_DENIED",
                audit_detail=_out_of_scope(caller.name, ref.key_name),
            )
        version_row = repo.get_version(ref.key_name, ref.version)
        if version_row is None:
            raise NotFound("BACKUP_NOT_FOUND", missing)
        if version_row.state == VersionState.DESTROYED:
            raise FailedPrecondition(
                "KEY_VERSION_DESTROYED",
                f"no key is bound to backup {backup_id} (its binding is missing, as after a "
                f"database restore), and the version its header names, {ref.key_name} version "
                f"{ref.version}, was destroyed: if the backup was retired to a newer version "
                "first, only its binding can restore it; restore the database from a backup "
                "that holds it",
            )
        material = self._usable_material(repo, ref.key_name, ref.version)
        try:
            data_key = crypto.unwrap_data_key(
                material, backup_id, ref.key_name, ref.version, ref.wrapped_data_key
            )
        except IntegrityFailure:
            raise InvalidArgument(
                "RECOVERY_KEY_MISMATCH",
                f"the wrapped data key offered for backup {backup_id} was not issued for it "
                f"under {ref.key_name} version {ref.version}",
            ) from None
        return data_key

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
        self._audit_denial(request.actor, request.action, audit, error)

    def _run_data_key_batch(self, requests: Sequence[_DataKeyRequest]) -> None:
        """One transaction for a batch of GetActiveKey / ResolveKeyForBackup calls.

        Every call's binding and audit event (allowed or denied) commit together;
        a call's outcome is published only after the commit.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with driver_transaction(self._engine) as statements:
                    store = DataKeyStore(statements, self._integrity)
                    bindings, events = self._decide_data_keys(store, requests)
                    store.add_bindings(bindings)
                    try:
                        store.append_audit_events(events)
                    except AUDIT_WRITE_ERRORS as error:
                        raise _AuditWriteFailed(error) from None
                return
            except _AuditWriteFailed as failed:
                if attempt < MAX_ATTEMPTS and _is_transient(failed.cause):
                    time.sleep(random.uniform(0, 0.005 * 2**attempt))
                    continue
                failure: BaseException = self._audit_unavailable(failed.cause)
            except DATABASE_ERRORS as error:
                if attempt < MAX_ATTEMPTS and _is_transient(error):
                    time.sleep(random.uniform(0, 0.005 * 2**attempt))
                    continue
                failure = self._unavailable(error)
            except Exception as error:  # a bug: fail every call of the batch, loudly
                log.exception("data-key batch failed")
                failure = error
            # Rolled back: no call of the batch changed anything.
            for request in requests:
                request.outcome = failure
            return

    def _decide_data_keys(
        self, store: DataKeyStore, requests: Sequence[_DataKeyRequest]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Sets each request's outcome; returns the new binding rows and the audit events."""
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
        seal = self._integrity.state
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

        new_bindings: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        now = now_us()
        for request in requests:
            audit = AuditContext(key_name=request.key_name, backup_id=request.backup_id)
            try:
                if request.action is Action.ISSUE_DATA_KEY:
                    creates_binding = request.backup_id not in bindings
                    issued = self._issue(request, bindings, actives, versions, audit, now)
                    if creates_binding:
                        new_bindings.append(_binding_row(issued, request.actor, now))
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
                fields = _storable({**vars(audit), "detail": error.audit_detail})
                outcome, status = Outcome.DENIED, error.audit_status
            fields.update(
                time_us=now,
                actor=request.actor,
                action=request.action,
                outcome=outcome,
                status_code=status,
            )
            events.append(fields)
        return new_bindings, events

    def _checked_version(self, key_name: str, version: int, facts: VersionFacts) -> _Version:
        """The hot path's view of a version row, carrying its MAC check's failure if any."""
        failure = None
        try:
            self._integrity.state.check(facts.sealed(key_name, version), facts.mac)
        except IntegrityFailure as error:
            failure = error
        return _Version(
            key_name, version, facts.state, facts.wrapped_material, failure, facts.destroy_due_us
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
            # A retry gets the data key again; nothing else does. Archive headers are
            # plaintext, so a backup id is no secret: without this, the backup role
            # could read any backup's data key (the restore role's job).
            cause = _not_a_retry(binding, request, now, self._retry_window_us)
            if cause:
                raise AlreadyExists(
                    "BACKUP_ID_IN_USE",
                    f"backup id {backup_id} is already in use; a new backup needs a new backup id",
                    audit_detail=f"backup id {backup_id} is already in use: {cause}",
                )
            if binding.stored is not None:
                # Who made the binding decides this hand-out: it must be what the server wrote.
                self._integrity.state.check(*binding.stored)
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
        material = self._material(active)
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
            raise _unknown_backup(request.backup_id)
        audit.key_name, audit.version = binding.key_name, binding.version
        if not request.scope.allows(binding.key_name):
            if request.recovery is not None:
                raise _NeedsRecovery()  # answered as the recovery of an unknown backup is
            raise _unknown_backup(request.backup_id, _out_of_scope(request.actor, binding.key_name))
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
            self._material(row),
            backup_id,
            binding.key_name,
            binding.version,
            binding.wrapped_data_key,
        )
        return DataKey(
            backup_id, binding.key_name, binding.version, data_key, binding.wrapped_data_key
        )

    def _run(
        self,
        actor: str,
        action: Action,
        audit: AuditContext,
        work: Callable[[Repository], T],
        *,
        audit_on_success: bool = True,
        action_of: Callable[[], Action] | None = None,
    ) -> T:
        """Runs a use case in one transaction with its audit event; retries transient conflicts."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self._sessions.begin() as session:
                    repo = Repository(session, self._integrity)
                    result = work(repo)
                    if audit_on_success:
                        _append_audit(
                            repo,
                            time_us=now_us(),
                            actor=actor,
                            action=action_of() if action_of else action,
                            outcome=Outcome.ALLOWED,
                            status_code="OK",
                            **asdict(audit),
                        )
                    # Each changed row names the event just appended, under its new MAC.
                    repo.seal_changed_state()
                return result
            except KmsError as error:
                if error.audited:
                    self._audit_denial(actor, action_of() if action_of else action, audit, error)
                raise
            except _AuditWriteFailed as failed:
                # Fail closed: the transaction rolled back, so the call changed nothing.
                if attempt < MAX_ATTEMPTS and _is_transient(failed.cause):
                    time.sleep(random.uniform(0, 0.005 * 2**attempt))
                    continue
                raise self._audit_unavailable(failed.cause) from None
            except DATABASE_ERRORS as error:
                if attempt < MAX_ATTEMPTS and _is_transient(error):
                    time.sleep(random.uniform(0, 0.005 * 2**attempt))
                    continue
                raise self._unavailable(error) from None
        raise AssertionError("unreachable")

    def _audit_denial(
        self, actor: str, action: Action, audit: AuditContext, error: KmsError
    ) -> None:
        fields = _storable({**asdict(audit), "detail": error.audit_detail})
        try:
            with self._sessions.begin() as session:
                Repository(session, self._integrity).append_audit(
                    time_us=now_us(),
                    actor=actor,
                    action=action,
                    outcome=Outcome.DENIED,
                    status_code=error.audit_status,
                    **fields,
                )
        except AUDIT_WRITE_ERRORS as db_error:
            # Fail closed: a denial we cannot record is reported as the outage it is.
            raise self._audit_unavailable(db_error) from None

    def _audit_unavailable(self, error: Exception) -> Unavailable:
        """An audit event could not be written, so the call it records was refused."""
        if isinstance(error, sa_exc.SQLAlchemyError) and _is_outage(error):
            return self._unavailable(error)
        cause = error.orig if isinstance(error, sa_exc.DBAPIError) else error
        log.error(
            "audit event not written, the call was refused and changed nothing: %s: %s",
            type(cause).__name__,
            str(cause).strip()[:200],
        )
        return Unavailable(
            "AUDIT_UNAVAILABLE",
            "the audit log cannot be written, so nothing was done; retry later",
        )

    def _unavailable(self, error: sa_exc.SQLAlchemyError) -> Unavailable:
        cause = error.orig if isinstance(error, sa_exc.DBAPIError) else error
        log.warning("database error: %s: %s", type(cause).__name__, str(cause).strip()[:200])
        if self._on_unavailable is not None:
            self._on_unavailable()
        return Unavailable("DATABASE_UNAVAILABLE", "the key database is unavailable; retry later")


class _VersionLike(Protocol):
    """A key version's row or the facts read about it (read-only)."""

    @property
    def key_name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def wrapped_material(self) -> bytes | None: ...
    @property
    def destroy_due_us(self) -> int | None: ...


@dataclass(frozen=True)
class _Version:
    key_name: str
    version: int
    state: str
    wrapped_material: bytes | None
    integrity_failure: IntegrityFailure | None = None  # the row failed its MAC check
    destroy_due_us: int | None = None


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
        _require(caller, Role.BACKUP)
        model.check_key_name(key_name)
        _require_key(caller, Role.BACKUP, key_name)
        model.check_backup_id(backup_id)

    return _DataKeyRequest(caller.name, Action.ISSUE_DATA_KEY, backup_id, key_name), check


def _resolve_request(
    caller: Principal, backup_id: str, recovery: BackupKeyReference | None
) -> tuple[_DataKeyRequest, Callable[[], None]]:
    """A ResolveKeyForBackup call's request for the batch, and the checks it must pass first."""

    def check() -> None:
        _require(caller, Role.RESTORE)
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


# Audit rows hold names and ids in VARCHAR(128) and versions in 32-bit integers.
_STRING_LIMITS = {"key_name": model.MAX_NAME_LENGTH, "backup_id": model.MAX_NAME_LENGTH}


def _storable(fields: dict[str, Any]) -> dict[str, Any]:
    """Makes a denial's fields fit its audit row: they may be the very input that was refused.

    Control characters are escaped (PostgreSQL text cannot hold NUL), strings are
    cut to their column's length, and numbers beyond the column's range become 0.
    """
    stored: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, str):
            value = "".join(c if c.isprintable() or c == "\t" else ascii(c)[1:-1] for c in value)
            value = value[: _STRING_LIMITS.get(name, model.MAX_REASON_LENGTH)]
        elif isinstance(value, int) and not 0 <= value <= model.MAX_VERSION:
            value = 0
        stored[name] = value
    return stored


class _AuditWriteFailed(Exception):
    """The database or the audit file refused an audit event (raised inside the transaction
    it belongs to)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__("audit write failed")
        self.cause = cause


def _append_audit(repo: Repository, **fields: Any) -> int:
    try:
        return repo.append_audit(**fields)
    except AUDIT_WRITE_ERRORS as error:
        raise _AuditWriteFailed(error) from None


def _is_outage(error: sa_exc.SQLAlchemyError) -> bool:
    """The database is unreachable or busy, as opposed to refusing this statement."""
    if isinstance(error, sa_exc.TimeoutError):
        return True
    return isinstance(error, sa_exc.DBAPIError) and (
        error.connection_invalidated or isinstance(error, sa_exc.OperationalError)
    )


def _require(caller: Principal, role: Role) -> None:
    if role not in caller.roles:
        raise PermissionDenied(
            "PERMISSION_DENIED", f"principal {caller.name} does not have the {role} role"
        )


def _require_whole_log(caller: Principal, doing: str) -> None:
    """The auditor role over every key: what the whole chain's verbs (verify, checkpoint) need,
    since the chain links events about every key."""
    _require(caller, Role.AUDITOR)
    if not caller.scope(Role.AUDITOR).everything:
        raise PermissionDenied(
            "SCOPE_TOO_NARROW",
            f"principal {caller.name} may audit only some keys; {doing} the whole "
            'audit log needs an auditor grant with keys = ["*"]',
        )


def _require_key(caller: Principal, role: Role, key_name: str) -> None:
    """The role for this key: out of scope is PERMISSION_DENIED whether or not the key exists."""
    if not caller.scope(role).allows(key_name):
        raise PermissionDenied(
            "KEY_NOT_IN_SCOPE",
            f"principal {caller.name} has no {role} grant for key {key_name}",
        )


def _out_of_scope(actor: str, key_name: str) -> str:
    return f"bound to key {key_name}, outside the restore grants of principal {actor}"


def _unknown_backup(backup_id: str, cause: str = "") -> NotFound:
    """What an unknown backup id gets; with a cause, a backup out of scope gets the same."""
    return NotFound(
        "BACKUP_NOT_FOUND",
        f"no key is bound to backup {backup_id}",
        audit_status="PERMISSION_DENIED" if cause else "",
        audit_detail=cause,
    )


def _concealed(error: KmsError, cause: str) -> KmsError:
    """The same answer as `error`, audited as the scope denial it really is."""
    return type(error)(
        error.reason, error.message, audit_status="PERMISSION_DENIED", audit_detail=cause
    )


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


P = TypeVar("P")


def _scoped_page(
    fetch: Callable[[P, int], Sequence[T]],
    allowed: Callable[[T], bool],
    position: Callable[[T], P],
    after: P,
    limit: int,
    unfiltered: bool,
) -> tuple[list[T], P, bool]:
    """One page of the rows in scope, the position to continue after, and whether to.

    Rows out of scope are skipped, reading at most SCOPED_SCAN_ROWS: a page may then
    hold fewer rows than asked, with a token to continue (AIP-158 allows short pages),
    so a narrow scope over a big table never makes one call scan all of it.
    """
    if unfiltered:
        rows = list(fetch(after, limit + 1))
        more = len(rows) > limit
        return rows[:limit], position(rows[limit - 1]) if more else after, more
    kept: list[T] = []
    batch = max(limit, 100)
    scanned = 0
    while True:
        rows = list(fetch(after, batch))
        for row in rows:
            if allowed(row):
                if len(kept) == limit:
                    return kept, position(kept[-1]), True
                kept.append(row)
        scanned += len(rows)
        if len(rows) < batch:
            return kept, after, False
        after = position(rows[-1])
        if scanned >= SCOPED_SCAN_ROWS:
            return kept, after, True


SCOPED_SCAN_ROWS = 10_000


def _existing_key(repo: Repository, key_name: str, *, for_update: bool = False) -> KeyRow:
    key = repo.get_key(key_name, for_update=for_update)
    if key is None:
        raise NotFound("KEY_NOT_FOUND", f"key {key_name} does not exist")
    return key


def _existing_version(repo: Repository, key_name: str, version: int) -> KeyVersionRow:
    row = repo.get_version(key_name, version)
    if row is None:
        raise NotFound("KEY_VERSION_NOT_FOUND", f"key {key_name} has no version {version}")
    return row


def _require_usable(row: _VersionLike, what: str) -> None:
    if row.state == VersionState.DESTROYED:
        raise FailedPrecondition(
            "KEY_VERSION_DESTROYED", f"{what}: {row.key_name} version {row.version} was destroyed"
        )
    if row.state == VersionState.DISABLED:
        raise FailedPrecondition(
            "KEY_VERSION_DISABLED",
            f"{what}: {row.key_name} version {row.version} is disabled (enable it first)",
        )
    if row.state == VersionState.PENDING_APPROVAL:
        raise FailedPrecondition(
            "KEY_VERSION_PENDING_APPROVAL",
            f"{what}: {row.key_name} version {row.version} is to be destroyed once a second "
            f"admin approves; `kmsctl cancel-destroy {row.key_name} {row.version}` cancels it",
        )
    if row.state == VersionState.DESTROY_SCHEDULED:
        raise FailedPrecondition(
            "KEY_VERSION_DESTROY_SCHEDULED",
            f"{what}: {row.key_name} version {row.version} is scheduled for destruction at "
            f"{format_time_us(row.destroy_due_us)}; until then `kmsctl cancel-destroy "
            f"{row.key_name} {row.version}` cancels it",
        )


def _refuse_if_scheduled(row: KeyVersionRow, verb: str) -> None:
    if row.state == VersionState.PENDING_APPROVAL:
        raise FailedPrecondition(
            "KEY_VERSION_PENDING_APPROVAL",
            f"cannot {verb} {row.key_name} version {row.version}: its destruction awaits a "
            f"second admin's approval; cancel it first with `kmsctl cancel-destroy "
            f"{row.key_name} {row.version}`",
        )
    if row.state == VersionState.DESTROY_SCHEDULED:
        raise FailedPrecondition(
            "KEY_VERSION_DESTROY_SCHEDULED",
            f"cannot {verb} {row.key_name} version {row.version}: its destruction is scheduled "
            f"for {format_time_us(row.destroy_due_us)}; cancel it first with `kmsctl "
            f"cancel-destroy {row.key_name} {row.version}`",
        )


def format_time_us(time_us: int | None) -> str:
    """A time as people read it in messages: ISO 8601, UTC, to the second."""
    if time_us is None:
        return "an unknown time"
    moment = datetime.datetime.fromtimestamp(time_us / 1e6, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _refuse_if_active_or_destroyed(row: KeyVersionRow, active: int | None, verb: str) -> None:
    if row.version == active:
        raise FailedPrecondition(
            "KEY_VERSION_ACTIVE",
            f"cannot {verb} {row.key_name} version {row.version}: it is the active version; "
            "rotate to another version first",
        )
    if row.state == VersionState.DESTROYED:
        raise FailedPrecondition(
            "KEY_VERSION_DESTROYED",
            f"cannot {verb} {row.key_name} version {row.version}: it is already destroyed",
        )
    _refuse_if_scheduled(row, verb)


def _version_info(
    row: KeyVersionRow, active_version: int | None, backup_count: int | None = None
) -> KeyVersionInfo:
    return KeyVersionInfo(
        key_name=row.key_name,
        version=row.version,
        state=VersionState(row.state),
        active=row.version == active_version,
        origin=VersionOrigin(row.origin),
        created_us=row.created_us,
        destroyed_us=row.destroyed_us,
        destroy_due_us=row.destroy_due_us,
        destroy_requested_by=row.destroy_requested_by,
        destroy_approved_by=row.destroy_approved_by,
        backup_count=backup_count,
    )


def _decode_name_token(page_token: str) -> str:
    """A ListKeys page token is the hex of the last key name of the previous page."""
    if not page_token:
        return ""
    try:
        name = bytes.fromhex(page_token).decode()
    except ValueError:
        name = ""
    # Only a key name is one we issued (a NUL in it would also break PostgreSQL's query).
    if model.KEY_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidArgument("PAGE_TOKEN_INVALID", "page_token is not one this server issued")
    return name


def _is_transient(error: Exception) -> bool:
    if not isinstance(error, sa_exc.DBAPIError):
        return False  # a pool timeout has already waited long enough
    sqlstate = getattr(error.orig, "sqlstate", None)
    if isinstance(error, sa_exc.IntegrityError):
        # Only a duplicate key is transient (a concurrent insert of the same key or
        # binding, which the retry then sees); any other constraint always fails.
        return sqlstate == UNIQUE_VIOLATION or getattr(error.orig, "sqlite_errorname", "") in (
            "SQLITE_CONSTRAINT_PRIMARYKEY",
            "SQLITE_CONSTRAINT_UNIQUE",
        )
    if sqlstate in RETRYABLE_SQLSTATES:
        return True
    return "database is locked" in str(error.orig)
