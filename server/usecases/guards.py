"""The checks use cases make before they act, and the refusals they raise.

Permission comes before existence: a caller without the role, or without a grant for the
key, is refused the same way whether or not the key exists.
"""

from __future__ import annotations

import datetime
from typing import Protocol

from server.db.models import KeyRow, KeyVersionRow
from server.db.repository import Repository
from server.domain import model
from server.domain.errors import FailedPrecondition, KmsError, NotFound, PermissionDenied
from server.domain.model import Principal, Role, VersionState


class VersionLike(Protocol):
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


def require(caller: Principal, role: Role) -> None:
    if role not in caller.roles:
        raise PermissionDenied(
            "PERMISSION_DENIED", f"principal {caller.name} does not have the {role} role"
        )


def require_key(caller: Principal, role: Role, key_name: str) -> None:
    """The role for this key: out of scope is PERMISSION_DENIED whether or not the key exists."""
    if not caller.scope(role).allows(key_name):
        raise PermissionDenied(
            "KEY_NOT_IN_SCOPE",
            f"principal {caller.name} has no {role} grant for key {key_name}",
        )


def require_whole_log(caller: Principal, doing: str) -> None:
    """The auditor role over every key: what the whole chain's verbs (verify, checkpoint) need,
    since the chain links events about every key."""
    require(caller, Role.AUDITOR)
    if not caller.scope(Role.AUDITOR).everything:
        raise PermissionDenied(
            "SCOPE_TOO_NARROW",
            f"principal {caller.name} may audit only some keys; {doing} the whole "
            'audit log needs an auditor grant with keys = ["*"]',
        )


def existing_key(repo: Repository, key_name: str, *, for_update: bool = False) -> KeyRow:
    key = repo.get_key(key_name, for_update=for_update)
    if key is None:
        raise NotFound("KEY_NOT_FOUND", f"key {key_name} does not exist")
    return key


def existing_version(
    repo: Repository, key_name: str, version: int, *, for_update: bool = False
) -> KeyVersionRow:
    row = repo.get_version(key_name, version, for_update=for_update)
    if row is None:
        raise NotFound("KEY_VERSION_NOT_FOUND", f"key {key_name} has no version {version}")
    return row


def admin_locked_version(
    repo: Repository, caller: Principal, key_name: str, version: int, reason: str
) -> tuple[KeyRow, KeyVersionRow]:
    """What every admin change to a version checks first: the admin's scope, the input, then
    the key and the version, both locked. The key first, so a concurrent rotation cannot make
    this version active meanwhile (and the scheduler waits)."""
    require(caller, Role.ADMIN)
    model.check_key_name(key_name)
    require_key(caller, Role.ADMIN, key_name)
    model.check_version(version)
    model.check_reason(reason)
    key = existing_key(repo, key_name, for_update=True)
    return key, existing_version(repo, key_name, version, for_update=True)


def require_usable(row: VersionLike, what: str) -> None:
    """Only an enabled version wraps or unwraps data keys; every other state says why not."""
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


def refuse_if_scheduled(row: KeyVersionRow, verb: str) -> None:
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


def refuse_if_active_or_destroyed(row: KeyVersionRow, active: int | None, verb: str) -> None:
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
    refuse_if_scheduled(row, verb)


def out_of_scope(actor: str, key_name: str) -> str:
    return f"bound to key {key_name}, outside the restore grants of principal {actor}"


def unknown_backup(backup_id: str, cause: str = "") -> NotFound:
    """What an unknown backup id gets; with a cause, a backup out of scope gets the same."""
    return NotFound(
        "BACKUP_NOT_FOUND",
        f"no key is bound to backup {backup_id}",
        audit_status="PERMISSION_DENIED" if cause else "",
        audit_detail=cause,
    )


def concealed(error: KmsError, cause: str) -> KmsError:
    """The same answer as `error`, audited as the scope denial it really is."""
    return type(error)(
        error.reason, error.message, audit_status="PERMISSION_DENIED", audit_detail=cause
    )


def format_time_us(time_us: int | None) -> str:
    """A time as people read it in messages: ISO 8601, UTC, to the second."""
    if time_us is None:
        return "an unknown time"
    moment = datetime.datetime.fromtimestamp(time_us / 1e6, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
