"""Recovering a lost binding: ResolveKeyForBackup for a backup the database has no binding
for (as after restoring the database from an older snapshot), offering what the archive's
header says about its key.

The header is plaintext, so nothing in it is trusted: its wrapped data key must unwrap under
the version it names with this backup id as associated data, the version must be usable, and
the caller must have a restore grant for its key. A caller out of scope gets the answer an
unknown backup would get (audited as the scope denial it is). Rare, so one transaction of its
own rather than a group-commit batch; the binding it makes is marked recovered.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.db.models import BackupBindingRow
from server.db.repository import Repository
from server.domain import model
from server.domain.errors import (
    FailedPrecondition,
    IntegrityFailure,
    InvalidArgument,
    KmsError,
    NotFound,
)
from server.domain.model import Action, DataKey, Principal, Role, VersionState
from server.keystore import crypto
from server.usecases import guards
from server.usecases.materials import KeyMaterials
from server.usecases.transactions import AuditContext, Transactions, now_us


@dataclass(frozen=True)
class BackupKeyReference:
    """What an archive header says about its key, offered for binding recovery."""

    key_name: str
    version: int
    wrapped_data_key: bytes


class BindingRecovery:
    def __init__(self, transactions: Transactions, materials: KeyMaterials) -> None:
        self._tx = transactions
        self._materials = materials

    def recover(self, caller: Principal, backup_id: str, recovery: BackupKeyReference) -> DataKey:
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
                cause = guards.out_of_scope(caller.name, binding.key_name)
                try:
                    self._check_recovery(caller, repo, backup_id, recovery, AuditContext())
                except KmsError as error:
                    raise guards.concealed(error, cause) from None
                raise guards.concealed(guards.unknown_backup(backup_id), cause)
            return self._data_key_from_binding(repo, binding)

        return self._tx.run(caller.name, action, audit, work, action_of=lambda: action)

    def _data_key_from_binding(self, repo: Repository, binding: BackupBindingRow) -> DataKey:
        material = self._materials.of_version(repo, binding.key_name, binding.version)
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
                audit_detail=guards.out_of_scope(caller.name, ref.key_name),
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
        material = self._materials.of(version_row)
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
