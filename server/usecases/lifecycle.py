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
(`KeyManagementService._forget_destroyed`).

Under the two-person rule (policy `destroy_approvals = 2`) a destroy first waits in
`pending_approval` until a different admin approves it; only then does the waiting period
start. Cancelling is possible at either stage, and every step is an audit event.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

from server import service as svc
from server.db.models import KeyRow, KeyVersionRow
from server.db.repository import Repository
from server.domain import model
from server.domain.errors import FailedPrecondition, KmsError, NotFound, PermissionDenied
from server.domain.model import Action, KeyVersionInfo, Outcome, Principal, Role, VersionState
from server.thread_names import name_os_thread
from server.usecases import rotation_schedule

if TYPE_CHECKING:
    from server.service import KeyManagementService

log = logging.getLogger(__name__)

# How many due destructions one pass of the scheduler reads (the rest wait for the next pass).
DUE_BATCH = 100
LONGEST_WAIT_SECONDS = 30.0
DEV_LONGEST_WAIT_SECONDS = 2.0
SHORTEST_WAIT_SECONDS = 0.005  # past the due time, so the pass finds it due
PAST_DUE_WAIT_SECONDS = 1.0


class Lifecycle:
    def __init__(
        self,
        service: KeyManagementService,
        destroy_delay_seconds: float,
        approvals: Callable[[], int] = lambda: 1,
        min_rotation_seconds: int = 3600,
    ) -> None:
        self._service = service
        self.min_rotation_seconds = min_rotation_seconds
        self._approvals = approvals  # read per call: the policy may be reloaded
        self._delay_us = int(destroy_delay_seconds * 1_000_000)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # Versions whose row failed its integrity check: audited once, then left alone.
        self._refused: set[tuple[str, int]] = set()
        self._refused_keys: set[str] = set()

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
        audit = svc.AuditContext(key_name=key_name, version=version, reason=reason[:1024])
        needs_approval = self._approvals() >= 2
        # A zero delay (dev mode only) destroys at once, as before scheduling existed.
        immediate = self._delay_us == 0 and not validate_only and not needs_approval
        # A refusal is audited as the request it refused, whatever the delay.
        action = Action.SCHEDULE_DESTROY
        if validate_only:
            action = Action.PREVIEW_DESTROY

        def work(repo: Repository) -> KeyVersionInfo:
            nonlocal action
            svc._require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            svc._require_key(caller, Role.ADMIN, key_name)
            model.check_version(version)
            model.check_reason(reason)
            # The key first: a concurrent rotation cannot make this version active meanwhile.
            key = svc._existing_key(repo, key_name, for_update=True)
            row = repo.get_version(key_name, version, for_update=True)
            if row is None:
                raise NotFound("KEY_VERSION_NOT_FOUND", f"key {key_name} has no version {version}")
            svc._refuse_if_active_or_destroyed(row, key.active_version, "destroy")
            now = svc.now_us()
            count = repo.backup_count(key_name, version)
            due = now + self._delay_us
            if validate_only:
                audit.detail = f"validate only: {count} backups bound"
                return dataclasses.replace(
                    svc._version_info(row, key.active_version, count),
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
                    f"destruction due {svc.format_time_us(due)}, {count} backups bound; cancel "
                    f"before then with kmsctl cancel-destroy {key_name} {version} "
                    f"(destroy_due_us={due})"
                )
            repo.flush()
            return svc._version_info(row, key.active_version, count)

        info = self._service._run(caller.name, action, audit, work, action_of=lambda: action)
        if immediate:
            self._service._forget_destroyed(key_name, version)
        elif not validate_only:
            self.wake()
        return info

    def cancel_destruction(
        self, caller: Principal, key_name: str, version: int, reason: str
    ) -> KeyVersionInfo:
        audit = svc.AuditContext(key_name=key_name, version=version, reason=reason[:1024])

        def work(repo: Repository) -> KeyVersionInfo:
            key, row = _locked_version(repo, caller, key_name, version, reason)
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
                f"due {svc.format_time_us(row.destroy_due_us)}"
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
            return svc._version_info(row, key.active_version, repo.backup_count(key_name, version))

        return self._service._run(caller.name, Action.CANCEL_DESTROY, audit, work)

    def approve_destruction(
        self, caller: Principal, key_name: str, version: int, reason: str
    ) -> KeyVersionInfo:
        """The second admin's approval: the waiting period starts now."""
        audit = svc.AuditContext(key_name=key_name, version=version, reason=reason[:1024])

        def work(repo: Repository) -> KeyVersionInfo:
            key, row = _locked_version(repo, caller, key_name, version, reason)
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
            due = svc.now_us() + self._delay_us
            row.state = VersionState.DESTROY_SCHEDULED
            row.destroy_due_us = due
            row.destroy_approved_by = caller.name
            # The replay reads the due time back from here (server.domain.state_replay).
            audit.detail = (
                f"approved the destruction asked by {row.destroy_requested_by}; due "
                f"{svc.format_time_us(due)} (destroy_due_us={due})"
            )
            repo.flush()
            count = repo.backup_count(key_name, version)
            return svc._version_info(row, key.active_version, count)

        approved = self._service._run(caller.name, Action.APPROVE_DESTROY, audit, work)
        self.wake()
        return approved

    # The scheduler

    def carry_out_due(self) -> int:
        """Destroys every scheduled version that is due (as many as one batch); returns how
        many this replica destroyed."""
        service = self._service
        try:
            with service._sessions() as session:
                due = Repository(session, service._integrity).due_destructions(
                    svc.now_us(), DUE_BATCH
                )
        except svc.DATABASE_ERRORS as error:
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
        audit = svc.AuditContext(key_name=key_name, version=version)

        def work(repo: Repository) -> bool:
            # Locked and read again: another replica may have destroyed it, or an admin
            # cancelled, since the search.
            key = svc._existing_key(repo, key_name, for_update=True)
            row = repo.get_version(key_name, version, for_update=True)
            now = svc.now_us()
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
                f"{approval}, due {svc.format_time_us(row.destroy_due_us)}"
            )
            _shred(row, now)
            repo.flush()
            svc._append_audit(
                repo,
                time_us=now,
                actor=model.SCHEDULER,
                action=Action.DESTROY_VERSION,
                outcome=Outcome.ALLOWED,
                status_code="OK",
                **asdict(audit),
            )
            return True

        done = self._service._run(
            model.SCHEDULER, Action.DESTROY_VERSION, audit, work, audit_on_success=False
        )
        if done:
            log.info("destroyed %s version %d as scheduled", key_name, version)
            self._service._forget_destroyed(key_name, version)
        return done

    def start(self) -> None:
        """Carries out what is already due, then keeps looking in a thread of its own."""
        if self._thread is not None:
            return
        self._pass()
        self._thread = threading.Thread(target=self._loop, name="kms-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def wake(self) -> None:
        """Something was scheduled here: look again now (other replicas' changes are seen
        within the longest wait)."""
        self._wake.set()

    def _loop(self) -> None:
        name_os_thread()
        while not self._stop.is_set():
            self._wake.wait(self._seconds_to_next())
            self._wake.clear()
            if not self._stop.is_set():
                self._pass()

    def _seconds_to_next(self) -> float:
        """Until the next due destruction or rotation the database knows of, within bounds:
        an idle server looks once per longest wait (30 s; 2 s in dev mode)."""
        longest = (
            DEV_LONGEST_WAIT_SECONDS if self.min_rotation_seconds == 0 else LONGEST_WAIT_SECONDS
        )
        service = self._service
        try:
            with service._sessions() as session:
                due = Repository(session, service._integrity).next_due()
        except svc.DATABASE_ERRORS:
            return longest
        if due is None:
            return longest
        left = (due - svc.now_us()) / 1e6
        if left <= 0:
            # Due and still there after a pass: refused, failed, or due just now. Again soon,
            # but not in a busy loop.
            return min(longest, PAST_DUE_WAIT_SECONDS)
        return min(longest, left + SHORTEST_WAIT_SECONDS)

    def _pass(self) -> None:
        try:
            self.carry_out_due()
            rotation_schedule.rotate_due_keys(self._service, self._refused_keys)
        except Exception:  # a bug: keep the scheduler alive, loudly
            log.exception("the lifecycle scheduler's pass failed")


def _shred(row: KeyVersionRow, now: int) -> None:
    """Crypto-shredding: the only copy of the material is erased, not flagged."""
    row.state = VersionState.DESTROYED
    row.wrapped_material = None
    row.destroyed_us = now


def _locked_version(
    repo: Repository, caller: Principal, key_name: str, version: int, reason: str
) -> tuple[KeyRow, KeyVersionRow]:
    """What cancelling and approving check first: the admin's scope, the input, then the key
    and the version, both locked (a concurrent rotation or scheduler waits)."""
    svc._require(caller, Role.ADMIN)
    model.check_key_name(key_name)
    svc._require_key(caller, Role.ADMIN, key_name)
    model.check_version(version)
    model.check_reason(reason)
    key = svc._existing_key(repo, key_name, for_update=True)
    row = repo.get_version(key_name, version, for_update=True)
    if row is None:
        raise NotFound("KEY_VERSION_NOT_FOUND", f"key {key_name} has no version {version}")
    return key, row
