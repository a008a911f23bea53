"""Automatic rotation, by period and by use.

By period: `UpdateKey` sets a key's rotation period; when it falls due the servers register
a new version and make it active, exactly once across replicas.

The period and the next due time are on the key row, under its MAC and in the audit replay.
Each replica's scheduler (server.usecases.lifecycle) looks for due keys; the rotation is made
under the key's row lock (SQLite: the write lock) after re-reading the due time, so the
replica that comes second finds the next time already moved and does nothing. The next
rotation is one period after the rotation itself, so a server that was down long rotates
once, not once per missed period. Audited as `system:scheduler`.

By use: each version counts the data keys it has wrapped (server.usecases.data_keys). When a
batch of GetActiveKey calls, or a retirement batch, would take the active version past the
server's `--max-data-keys-per-version`, the key is rotated first (`rotate_for_use`), under
the key's and the version's row locks after reading the count again, so of two replicas that
both see the bound only one rotates. The bound's minimum (`model.MIN_DATA_KEYS_PER_VERSION`)
is above the largest batch, so one rotation always makes room for a whole batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict

from server.db.models import KeyRow, KeyVersionRow
from server.db.repository import Repository
from server.domain import model
from server.domain.errors import InvalidArgument, KmsError
from server.domain.model import (
    Action,
    KeyInfo,
    Outcome,
    Principal,
    Role,
    VersionOrigin,
    VersionState,
)
from server.usecases import guards
from server.usecases.materials import KeyMaterials
from server.usecases.transactions import (
    DATABASE_ERRORS,
    AuditContext,
    Transactions,
    append_audit,
    now_us,
)

log = logging.getLogger(__name__)

MIN_PERIOD_SECONDS = 3600  # outside dev mode
MAX_PERIOD_SECONDS = 100 * 365 * 86400
DUE_BATCH = 100


class AutoRotation:
    def __init__(
        self,
        transactions: Transactions,
        materials: KeyMaterials,
        wake_scheduler: Callable[[], None],
        *,
        min_period_seconds: int = MIN_PERIOD_SECONDS,
    ) -> None:
        self._tx = transactions
        self._materials = materials
        self._wake_scheduler = wake_scheduler
        self.min_period_seconds = min_period_seconds  # 0 in dev mode
        # Keys whose row failed its integrity check: audited once, then left alone.
        self._refused: set[str] = set()

    def update_key(
        self,
        caller: Principal,
        key_name: str,
        rotation_period_seconds: int,
    ) -> KeyInfo:
        """Sets (or, with 0, turns off) the key's automatic rotation period."""
        audit = AuditContext(key_name=key_name)

        def work(repo: Repository) -> KeyInfo:
            guards.require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            guards.require_key(caller, Role.ADMIN, key_name)
            if rotation_period_seconds and not (
                self.min_period_seconds <= rotation_period_seconds <= MAX_PERIOD_SECONDS
            ):
                raise InvalidArgument(
                    "ROTATION_PERIOD_INVALID",
                    f"rotation_period_seconds must be 0 (off) or from {self.min_period_seconds} to "
                    f"{MAX_PERIOD_SECONDS}",
                )
            key = guards.existing_key(repo, key_name, for_update=True)
            if rotation_period_seconds:
                period = rotation_period_seconds * 1_000_000
                key.rotation_period_us = period
                key.next_rotation_us = now_us() + period
                # The replay reads both back from here (server.domain.state_replay).
                audit.detail = (
                    f"automatic rotation every {rotation_period_seconds}s, next at "
                    f"{guards.format_time_us(key.next_rotation_us)} (rotation_period_us={period} "
                    f"next_rotation_us={key.next_rotation_us})"
                )
            else:
                key.rotation_period_us = None
                key.next_rotation_us = None
                audit.detail = "automatic rotation off"
            repo.flush()
            count = len(repo.list_versions(key_name))
            return KeyInfo(
                key.name,
                key.active_version,
                count,
                key.created_us,
                key.rotation_period_us,
                key.next_rotation_us,
            )

        updated = self._tx.run(caller.name, Action.UPDATE_KEY, audit, work)
        self._wake_scheduler()
        return updated

    def rotate_due_keys(self) -> int:
        """Rotates every key whose automatic rotation is due; returns how many this replica did.
        A key whose row fails its integrity check is audited once, then left alone by this
        process."""
        try:
            with self._tx.sessions() as session:
                due = Repository(session, self._tx.integrity).due_rotations(now_us(), DUE_BATCH)
        except DATABASE_ERRORS as error:
            log.warning("the scheduler could not read due rotations: %s", type(error).__name__)
            return 0
        rotated = 0
        for key_name in due:
            if key_name in self._refused:
                continue
            try:
                rotated += self._rotate_if_due(key_name)
            except KmsError as error:
                if error.status_name == "DATA_LOSS":
                    self._refused.add(key_name)
                log.error(
                    "the automatic rotation of %s was not made: %s (%s)",
                    key_name,
                    error.message,
                    error.reason,
                )
        return rotated

    def _rotate_if_due(self, key_name: str) -> int:
        def work(repo: Repository) -> bool:
            key = guards.existing_key(repo, key_name, for_update=True)
            now = now_us()
            period = key.rotation_period_us
            if key.next_rotation_us is None or key.next_rotation_us > now or period is None:
                return False  # another replica rotated it, or the period was changed meanwhile
            self._rotate(repo, key, now, f"automatic rotation (every {period // 1_000_000}s)")
            return True

        return int(self._as_scheduler(key_name, work, "its rotation period fell due"))

    def rotate_for_use(self, key_name: str, wanted: int, bound: int) -> bool:
        """Rotates the key if its active version cannot wrap `wanted` more data keys within
        `bound`; returns whether this call rotated it."""

        def work(repo: Repository) -> bool:
            key = guards.existing_key(repo, key_name, for_update=True)
            if key.active_version is None:
                return False
            active = guards.existing_version(repo, key_name, key.active_version, for_update=True)
            if active.data_keys_wrapped + wanted <= bound:
                return False  # another replica rotated it first
            self.rotate_in(repo, key, active, bound)
            return True

        return self._as_scheduler(key_name, work, "its active version reached the data-key bound")

    def _as_scheduler(self, key_name: str, work: Callable[[Repository], bool], why: str) -> bool:
        """Runs a rotation as `system:scheduler` (`work` appends its events, or returns False
        when there is nothing to do after all)."""
        audit = AuditContext(key_name=key_name)
        done = self._tx.run(
            model.SCHEDULER, Action.REGISTER_VERSION, audit, work, audit_on_success=False
        )
        if done:
            log.info("rotated %s automatically: %s", key_name, why)
        return done

    def rotate_in(
        self, repo: Repository, key: KeyRow, active: KeyVersionRow, bound: int
    ) -> KeyVersionRow:
        """Rotation by use inside the caller's transaction (a retirement batch); returns the
        new active version's row."""
        why = (
            f"automatic rotation by use: version {active.version} has wrapped "
            f"{active.data_keys_wrapped} data keys, and the bound is {bound}"
        )
        return self._rotate(repo, key, now_us(), why)

    def _rotate(self, repo: Repository, key: KeyRow, now: int, why: str) -> KeyVersionRow:
        """Registers a generated version and makes it active, in the caller's transaction,
        audited as `system:scheduler`; the next periodic rotation is one period from now.
        Returns the new version's row."""
        version = key.last_version + 1
        row = KeyVersionRow(
            key_name=key.name,
            version=version,
            state=VersionState.ENABLED,
            origin=VersionOrigin.GENERATED,
            wrapped_material=self._materials.new_wrapped(key.name, version),
            created_us=now,
            destroyed_us=None,
            data_keys_wrapped=0,
        )
        repo.add_version(row)
        previous = key.active_version
        key.last_version = version
        key.active_version = version
        detail = f"{why}: origin=generated, activated"
        if key.rotation_period_us is not None:
            key.next_rotation_us = now + key.rotation_period_us
            # The replay reads the next time back from here (server.domain.state_replay).
            detail += (
                f"; next at {guards.format_time_us(key.next_rotation_us)} "
                f"(next_rotation_us={key.next_rotation_us})"
            )
        repo.flush()
        audit = AuditContext(
            key_name=key.name,
            version=version,
            from_version=previous or 0,
            to_version=version,
            detail=detail,
        )
        append_audit(
            repo,
            time_us=now,
            actor=model.SCHEDULER,
            action=Action.REGISTER_VERSION,
            outcome=Outcome.ALLOWED,
            status_code="OK",
            **asdict(audit),
        )
        # Sealed as changed by this event, not by whatever the caller appends next.
        repo.seal_changed_state()
        return row
