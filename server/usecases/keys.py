"""Keys and their versions: register, rotate, read, disable and enable.

Every call is one transaction with its audit event (server.usecases.transactions). The
key's row is locked before its versions, so a rotation and a change to a version cannot
interleave: nobody disables the version a concurrent rotation is making active.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from server.db.models import KeyVersionRow
from server.db.repository import Repository
from server.domain import model
from server.domain.errors import Aborted, FailedPrecondition, InvalidArgument
from server.domain.model import (
    Action,
    KeyInfo,
    KeyVersionInfo,
    Outcome,
    Principal,
    Role,
    Rotation,
    VersionOrigin,
    VersionState,
)
from server.usecases import guards, paging
from server.usecases.materials import KeyMaterials
from server.usecases.transactions import AuditContext, Transactions, append_audit, now_us


class KeyVersions:
    def __init__(self, transactions: Transactions, materials: KeyMaterials) -> None:
        self._tx = transactions
        self._materials = materials

    def register_key_version(
        self,
        caller: Principal,
        key_name: str,
        imported_material: bytes,
        activate_first_version: bool,
    ) -> KeyVersionInfo:
        audit = AuditContext(key_name=key_name)

        def work(repo: Repository) -> KeyVersionInfo:
            guards.require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            guards.require_key(caller, Role.ADMIN, key_name)
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
            row = KeyVersionRow(
                key_name=key_name,
                version=version,
                state=VersionState.ENABLED,
                origin=origin,
                wrapped_material=self._materials.new_wrapped(key_name, version, imported_material),
                created_us=created,
                destroyed_us=None,
                data_keys_wrapped=0,
            )
            repo.add_version(row)
            key.last_version = version
            if activate_first_version:
                key.active_version = version
                audit.to_version = version
            audit.detail = f"origin={origin}" + (", activated" if activate_first_version else "")
            repo.flush()
            return version_info(row, key.active_version)

        return self._tx.run(caller.name, Action.REGISTER_VERSION, audit, work)

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
            guards.require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            guards.require_key(caller, Role.ADMIN, key_name)
            model.check_version(to_version, "to_version")
            model.check_reason(reason)
            key = guards.existing_key(repo, key_name, for_update=True)
            current = key.active_version or 0
            audit.from_version = current
            target = guards.existing_version(repo, key_name, to_version, for_update=True)
            if expected_active_version is not None and expected_active_version != current:
                raise Aborted(
                    "ACTIVE_VERSION_CHANGED",
                    f"the active version of {key_name} is {current}, not the expected "
                    f"{expected_active_version}; nothing was changed",
                )
            guards.require_usable(target, f"cannot make {key_name} version {to_version} active")
            if current == to_version:
                raise FailedPrecondition(
                    "ALREADY_ACTIVE", f"{key_name} version {to_version} is already active"
                )
            key.active_version = to_version
            rotated = now_us()
            sequence = append_audit(
                repo,
                time_us=rotated,
                actor=caller.name,
                action=Action.ROTATE,
                outcome=Outcome.ALLOWED,
                status_code="OK",
                **asdict(audit),
            )
            return Rotation(current or None, to_version, rotated, sequence)

        return self._tx.run(caller.name, Action.ROTATE, audit, work, audit_on_success=False)

    def get_key_version(self, caller: Principal, key_name: str, version: int) -> KeyVersionInfo:
        audit = AuditContext(key_name=key_name, version=version)

        def work(repo: Repository) -> KeyVersionInfo:
            guards.require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            guards.require_key(caller, Role.ADMIN, key_name)
            model.check_version(version)
            key = guards.existing_key(repo, key_name)
            row = guards.existing_version(repo, key_name, version)
            return version_info(row, key.active_version, repo.backup_count(key_name, version))

        return self._tx.run(caller.name, Action.GET_VERSION, audit, work)

    def list_key_versions(self, caller: Principal, key_name: str) -> list[KeyVersionInfo]:
        audit = AuditContext(key_name=key_name)

        def work(repo: Repository) -> list[KeyVersionInfo]:
            guards.require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            guards.require_key(caller, Role.ADMIN, key_name)
            key = guards.existing_key(repo, key_name)
            counts = repo.backup_counts(key_name)
            return [
                version_info(row, key.active_version, counts.get(row.version, 0))
                for row in repo.list_versions(key_name)
            ]

        return self._tx.run(caller.name, Action.LIST_VERSIONS, audit, work)

    def list_keys(
        self, caller: Principal, page_size: int, page_token: str
    ) -> tuple[list[KeyInfo], str]:
        def work(repo: Repository) -> tuple[list[KeyInfo], str]:
            guards.require(caller, Role.ADMIN)
            limit = model.check_page_size(page_size)
            after = paging.decode_name_token(page_token, model.KEY_NAME_PATTERN)
            scope = caller.scope(Role.ADMIN)
            rows, last, more = paging.scoped_page(
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
            return keys, paging.name_token(last) if more else ""

        return self._tx.run(caller.name, Action.LIST_KEYS, AuditContext(), work)

    def disable_key_version(
        self, caller: Principal, key_name: str, version: int, reason: str
    ) -> KeyVersionInfo:
        def change(row: KeyVersionRow, active: int | None) -> None:
            if row.state == VersionState.DISABLED:
                raise FailedPrecondition(
                    "ALREADY_DISABLED", f"{key_name} version {version} is already disabled"
                )
            guards.refuse_if_active_or_destroyed(row, active, "disable")
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
            guards.refuse_if_scheduled(row, "enable")
            row.state = VersionState.ENABLED

        return self._change_version(
            caller, Action.ENABLE_VERSION, key_name, version, reason, change
        )

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
            key, row = guards.admin_locked_version(repo, caller, key_name, version, reason)
            change(row, key.active_version)
            repo.flush()
            return version_info(row, key.active_version)

        return self._tx.run(caller.name, action, audit, work)


def version_info(
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
        data_keys_wrapped=row.data_keys_wrapped or 0,
    )
