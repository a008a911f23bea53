"""Destroying a key version: scheduled, cancellable until due, then carried out by the servers.

`DestroyKeyVersion` only schedules: the version becomes `destroy_scheduled`, unusable, with
its material kept and `destroy_due_us` = now + the waiting period. Until then an admin can
cancel (the version returns to `disabled`). Every replica's scheduler looks for due
destructions; each is carried out under the key's and the version's row locks (SQLite: the
database's write lock) after re-reading the state, so exactly one replica destroys it and the
others find it already destroyed. The due time is in the database, so a destruction that fell
due while every server was down is carried out at the next start.

The destruction is audited with actor `system:scheduler`, naming the admin who asked, and
carries every crypto-shredding guarantee of an immediate destroy
(`KeyMaterials.forget_destroyed`).

Under the two-person rule (policy `destroy_approvals = 2`) a destroy first waits in
`pending_approval` until a different admin approves it; only then does the waiting period
start. Cancelling is possible at either stage, and every step is an audit event.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import asdict

from server.db.models import KeyVersionRow
from server.db.repository import Repository
from server.domain import model
from server.domain.errors import FailedPrecondition, KmsError, PermissionDenied
from server.domain.model import Action, KeyVersionInfo, Outcome, Principal, VersionState
from server.usecases import guards
from server.usecases.keys import version_info
from server.usecases.materials import KeyMaterials
from server.usecases.transactions import (
    DATABASE_ERRORS,
    AuditContext,
    Transactions,
    append_audit,
    now_us,
)

log = logging.getLogger(__name__)

# How many due destructions one pass of the scheduler reads (the rest wait for the next pass).
DUE_BATCH = 100


class Lifecycle:
    def __init__(
        self,
        transactions: Transactions,
        materials: KeyMaterials,
        wake_scheduler: Callable[[], None],
        destroy_delay_seconds: float,
        approvals: Callable[[], int] = lambda: 1,
    ) -> None:
        self._tx = transactions
        self._materials = materials
        self._wake_scheduler = wake_scheduler
        self._approvals = approvals  # read per call: the policy may be reloaded
        self._delay_us = int(destroy_delay_seconds * 1_000_000)
        # Versions whose row failed its integrity check: audited once, then left alone.
        self._refused: set[tuple[str, int]] = set()

    # Use cases

    def schedule_destruction(
        self,
        caller: Principal,
        key_name: str,
        version: int,
        reason: str,
        *,
        validate_only: bool = False,
    ) -> KeyVersionInfo:
        audit = AuditContext(key_name=key_name, version=version, reason=reason[:1024])
        needs_approval = self._approvals() >= 2
        # A zero delay (dev mode only) destroys at once, as before scheduling existed.
        immediate = self._delay_us == 0 and not validate_only and not needs_approval
        # A refusal is audited as the request it refused, whatever the delay.
        action = Action.SCHEDULE_DESTROY
        if validate_only:
            action = Action.PREVIEW_DESTROY

        def work(repo: Repository) -> KeyVersionInfo:
            nonlocal action
            key, row = guards.admin_locked_version(repo, caller, key_name, version, reason)
            guards.refuse_if_active_or_destroyed(row, key.active_version, "destroy")
            now = now_us()
            count = repo.backup_count(key_name, version)
            due = now + self._delay_us
            if validate_only:
                audit.detail = f"validate only: {count} backups bound"
                return dataclasses.replace(
                    version_info(row, key.active_version, count),
                    state=(
                        VersionState.PENDING_APPROVAL
                        if needs_approval
                        else VersionState.DESTROY_SCHEDULED
                    ),
                    destroy_due_us=due,
                    destroy_requested_by=caller.name,
                )
            if immediate:
                _shred(row, now)
                action = Action.DESTROY_VERSION  # what the replay reads: carried out
                audit.detail = f"{count} backups bound"
            elif needs_approval:
                # No due time yet: the waiting period starts with the approval.
                row.state = VersionState.PENDING_APPROVAL
                row.destroy_requested_by = caller.name
                audit.detail = (
                    f"pending a second admin's approval, {count} backups bound; approve with "
                    f"kmsctl approve-destroy {key_name} {version}, or cancel with kmsctl "
                    f"cancel-destroy {key_name} {version}"
                )
            else:
                row.state = VersionState.DESTROY_SCHEDULED
                row.destroy_due_us = due
                row.destroy_requested_by = caller.name
                # The replay reads the due time back from here (server.domain.state_replay).
                audit.detail = (
                    f"destruction due {guards.format_time_us(due)}, {count} backups bound; cancel "
                    f"before then with kmsctl cancel-destroy {key_name} {version} "
                    f"(destroy_due_us={due})"
                )
            repo.flush()
            return version_info(row, key.active_version, count)

        info = self._tx.run(caller.name, action, audit, work, action_of=lambda: action)
        if immediate:
            self._materials.forget_destroyed(key_name, version)
        elif not validate_only:
            self._wake_scheduler()
        return info

    def cancel_destruction(
        self, caller: Principal, key_name: str, version: int, reason: str
    ) -> KeyVersionInfo:
        audit = AuditContext(key_name=key_name, version=version, reason=reason[:1024])

        def work(repo: Repository) -> KeyVersionInfo:
            key, row = guards.admin_locked_version(repo, caller, key_name, version, reason)
            if row.state == VersionState.DESTROYED:
                raise FailedPrecondition(
                    "KEY_VERSION_DESTROYED",
                    f"{key_name} version {version} was already destroyed; it cannot be restored",
                )
            if row.state not in (VersionState.DESTROY_SCHEDULED, VersionState.PENDING_APPROVAL):
                raise FailedPrecondition(
                    "DESTRUCTION_NOT_SCHEDULED",
                    f"{key_name} version {version} is {row.state}: no destruction is scheduled",
                )
            due = (
                f"due {guards.format_time_us(row.destroy_due_us)}"
                if row.destroy_due_us is not None
                else "pending approval"
            )
            audit.detail = (
                f"cancelled the destruction asked by {row.destroy_requested_by}, {due}; the "
                "version is disabled"
            )
            row.state = VersionState.DISABLED
            row.destroy_due_us = None
            row.destroy_requested_by = None
            row.destroy_approved_by = None
            repo.flush()
            return version_info(row, key.active_version, repo.backup_count(key_name, version))

        return self._tx.run(caller.name, Action.CANCEL_DESTROY, audit, work)

    def approve_destruction(
        self, caller: Principal, key_name: str, version: int, reason: str
    ) -> KeyVersionInfo:
        """The second admin's approval: the waiting period starts now."""
        audit = AuditContext(key_name=key_name, version=version, reason=reason[:1024])

        def work(repo: Repository) -> KeyVersionInfo:
            key, row = guards.admin_locked_version(repo, caller, key_name, version, reason)
            if row.state != VersionState.PENDING_APPROVAL:
                raise FailedPrecondition(
                    "DESTRUCTION_NOT_PENDING",
                    f"{key_name} version {version} is {row.state}: no destruction awaits approval",
                )
            if row.destroy_requested_by == caller.name:
                raise PermissionDenied(
                    "SELF_APPROVAL",
                    f"{caller.name} asked for the destruction of {key_name} version {version}; "
                    "a different admin must approve it",
                )
            due = now_us() + self._delay_us
            row.state = VersionState.DESTROY_SCHEDULED
            row.destroy_due_us = due
            row.destroy_approved_by = caller.name
            # The replay reads the due time back from here (server.domain.state_replay).
            audit.detail = (
                f"approved the destruction asked by {row.destroy_requested_by}; due "
                f"{guards.format_time_us(due)} (destroy_due_us={due})"
            )
            repo.flush()
            count = repo.backup_count(key_name, version)
            return version_info(row, key.active_version, count)

        approved = self._tx.run(caller.name, Action.APPROVE_DESTROY, audit, work)
        self._wake_scheduler()
        return approved

    # The scheduler

    def carry_out_due(self) -> int:
        """Destroys every scheduled version that is due (as many as one batch); returns how
        many this replica destroyed."""
        try:
            with self._tx.sessions() as session:
                due = Repository(session, self._tx.integrity).due_destructions(now_us(), DUE_BATCH)
        except DATABASE_ERRORS as error:
            log.warning("the scheduler could not read due destructions: %s", type(error).__name__)
            return 0
        destroyed = 0
        for key_name, version in due:
            if (key_name, version) in self._refused:
                continue
            try:
                if self._destroy_if_due(key_name, version):
                    destroyed += 1
            except KmsError as error:
                if error.status_name == "DATA_LOSS":
                    self._refused.add((key_name, version))
                log.error(
                    "the scheduled destruction of %s version %d was not carried out: %s (%s)",
                    key_name,
                    version,
                    error.message,
                    error.reason,
                )
        return destroyed

    def _destroy_if_due(self, key_name: str, version: int) -> bool:
        audit = AuditContext(key_name=key_name, version=version)

        def work(repo: Repository) -> bool:
            # Locked and read again: another replica may have destroyed it, or an admin
            # cancelled, since the search.
            key = guards.existing_key(repo, key_name, for_update=True)
            row = repo.get_version(key_name, version, for_update=True)
            now = now_us()
            if (
                row is None
                or row.state != VersionState.DESTROY_SCHEDULED
                or row.destroy_due_us is None
                or row.destroy_due_us > now
            ):
                return False
            if row.version == key.active_version:  # the schema and schedule forbid it
                raise FailedPrecondition(
                    "KEY_VERSION_ACTIVE", f"{key_name} version {version} is active"
                )
            approval = f", approved by {row.destroy_approved_by}" if row.destroy_approved_by else ""
            audit.detail = (
                f"scheduled destruction carried out, asked by {row.destroy_requested_by}"
                f"{approval}, due {guards.format_time_us(row.destroy_due_us)}"
            )
            _shred(row, now)
            repo.flush()
            append_audit(
                repo,
                time_us=now,
                actor=model.SCHEDULER,
                action=Action.DESTROY_VERSION,
                outcome=Outcome.ALLOWED,
                status_code="OK",
                **asdict(audit),
            )
            return True

        done = self._tx.run(
            model.SCHEDULER, Action.DESTROY_VERSION, audit, work, audit_on_success=False
        )
        if done:
            log.info("destroyed %s version %d as scheduled", key_name, version)
            self._materials.forget_destroyed(key_name, version)
        return done


def _shred(row: KeyVersionRow, now: int) -> None:
    """Crypto-shredding: the only copy of the material is erased, not flagged."""
    row.state = VersionState.DESTROYED
    row.wrapped_material = None
    row.destroyed_us = now
