"""Retiring a key version by rewrapping: its backups move to the key's active version.

Each call rewraps one bounded batch of the backups bound to `from_version`, in its own
transaction with an audit event carrying the counts: the data key of each is unwrapped under
the old version and wrapped again under the active one, inside the server, and the binding
now names the active version. The backups' bytes are never touched: an archive still names
its old version in its header, and restores through its binding. A rerun continues where the
last batch ended, and a batch that finds nothing left changes nothing, so it is safe to repeat
and to run while backups and restores go on (rows are locked; SQLite holds its write lock).
When `remaining` is 0 the version's `backup_count` is 0 and destroying it loses no backup.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.db.repository import Repository
from server.domain import model
from server.domain.errors import FailedPrecondition, InvalidArgument
from server.domain.model import Action, Principal, Role, VersionState
from server.keystore import crypto
from server.usecases import guards
from server.usecases.auto_rotation import AutoRotation
from server.usecases.materials import KeyMaterials
from server.usecases.transactions import AuditContext, Transactions

DEFAULT_BATCH = 500
MAX_BATCH = 5000


@dataclass(frozen=True)
class RewrapProgress:
    key_name: str
    from_version: int
    to_version: int
    rewrapped: int  # in this batch
    remaining: int  # still bound to from_version after it


class Retirement:
    def __init__(
        self,
        transactions: Transactions,
        materials: KeyMaterials,
        auto_rotation: AutoRotation,
        max_data_keys_per_version: int,
    ) -> None:
        self._tx = transactions
        self._materials = materials
        self._auto_rotation = auto_rotation
        self._max_wrapped = max_data_keys_per_version

    def rewrap_backups(
        self,
        caller: Principal,
        key_name: str,
        from_version: int,
        batch_size: int,
    ) -> RewrapProgress:
        audit = AuditContext(key_name=key_name, version=from_version, from_version=from_version)

        def work(repo: Repository) -> RewrapProgress:
            guards.require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            guards.require_key(caller, Role.ADMIN, key_name)
            model.check_version(from_version, "from_version")
            if not 0 <= batch_size <= MAX_BATCH:
                raise InvalidArgument(
                    "BATCH_SIZE_INVALID", f"batch_size must be from 0 (default) to {MAX_BATCH}"
                )
            # Within the data-key bound, so one rotation always makes room for the batch.
            limit = min(batch_size or DEFAULT_BATCH, self._max_wrapped)
            # The key's lock: no rotation while the batch moves backups to its active version.
            key = guards.existing_key(repo, key_name, for_update=True)
            source = guards.existing_version(repo, key_name, from_version)
            to_version = key.active_version
            if to_version is None:
                raise FailedPrecondition(
                    "NO_ACTIVE_VERSION", f"key {key_name} has no active version to rewrap to"
                )
            if to_version == from_version:
                raise FailedPrecondition(
                    "KEY_VERSION_ACTIVE",
                    f"{key_name} version {from_version} is the active version; rotate to another "
                    "version first, then retire this one",
                )
            if source.state == VersionState.DESTROYED or source.wrapped_material is None:
                raise FailedPrecondition(
                    "KEY_VERSION_DESTROYED",
                    f"{key_name} version {from_version} was destroyed: its backups cannot be "
                    "rewrapped",
                )
            # Locked: data-key batches add to its count of wrapped keys too.
            target = guards.existing_version(repo, key_name, to_version, for_update=True)
            bindings = repo.bindings_to_rewrap(key_name, from_version, limit)
            if bindings and target.data_keys_wrapped + len(bindings) > self._max_wrapped:
                target = self._auto_rotation.rotate_in(repo, key, target, self._max_wrapped)
                to_version = target.version
            audit.to_version = to_version
            target_material = self._materials.of(target)
            if bindings:
                # A disabled or scheduled version may be retired: its material is read here only.
                old_material = self._materials.root_key.unwrap_version_material(
                    key_name, from_version, source.wrapped_material
                )
                try:
                    for binding in bindings:
                        data_key = crypto.unwrap_data_key(
                            old_material,
                            binding.backup_id,
                            key_name,
                            from_version,
                            binding.wrapped_data_key,
                        )
                        binding.wrapped_data_key = crypto.wrap_data_key(
                            target_material, binding.backup_id, key_name, to_version, data_key
                        )
                        binding.version = to_version
                        repo.reseal_binding(binding)  # its MAC covers the version
                finally:
                    crypto.wipe(old_material)
                target.data_keys_wrapped += len(bindings)
                repo.flush()
            remaining = repo.backup_count(key_name, from_version)
            audit.detail = (
                f"rewrapped {len(bindings)} backups from version {from_version} to version "
                f"{to_version}; {remaining} remain"
            )
            if bindings:
                # The replay reads the target's count back from here (server.domain.state_replay).
                audit.detail += f" (data_keys_wrapped={target.data_keys_wrapped})"
            return RewrapProgress(key_name, from_version, to_version, len(bindings), remaining)

        return self._tx.run(caller.name, Action.REWRAP_BACKUPS, audit, work)
