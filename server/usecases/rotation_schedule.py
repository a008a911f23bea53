"""Automatic rotation by period: `UpdateKey` sets a key's rotation period; when it falls due
the servers register a new version and make it active, exactly once across replicas.

The period and the next due time are on the key row, under its MAC and in the audit replay.
Each replica's scheduler (server.usecases.lifecycle) looks for due keys; the rotation is made
under the key's row lock (SQLite: the write lock) after re-reading the due time, so the
replica that comes second finds the next time already moved and does nothing. The next
rotation is one period after the rotation itself, so a server that was down long rotates
once, not once per missed period. Audited as `system:scheduler`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING

from server import crypto
from server import service as svc
from server.db.models import KeyVersionRow
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

if TYPE_CHECKING:
    from server.service import KeyManagementService

log = logging.getLogger(__name__)

MIN_PERIOD_SECONDS = 3600  # outside dev mode
MAX_PERIOD_SECONDS = 100 * 365 * 86400
DUE_BATCH = 100


def update_key(
    service: KeyManagementService,
    caller: Principal,
    key_name: str,
    rotation_period_seconds: int,
    min_period_seconds: int,
) -> KeyInfo:
    """Sets (or, with 0, turns off) the key's automatic rotation period."""
    audit = svc.AuditContext(key_name=key_name)

    def work(repo: Repository) -> KeyInfo:
        svc._require(caller, Role.ADMIN)
        model.check_key_name(key_name)
        svc._require_key(caller, Role.ADMIN, key_name)
        if rotation_period_seconds and not (
            min_period_seconds <= rotation_period_seconds <= MAX_PERIOD_SECONDS
        ):
            raise InvalidArgument(
                "ROTATION_PERIOD_INVALID",
                f"rotation_period_seconds must be 0 (off) or from {min_period_seconds} to "
                f"{MAX_PERIOD_SECONDS}",
            )
        key = svc._existing_key(repo, key_name, for_update=True)
        if rotation_period_seconds:
            period = rotation_period_seconds * 1_000_000
            key.rotation_period_us = period
            key.next_rotation_us = svc.now_us() + period
            # The replay reads both back from here (server.domain.state_replay).
            audit.detail = (
                f"automatic rotation every {rotation_period_seconds}s, next at "
                f"{svc.format_time_us(key.next_rotation_us)} (rotation_period_us={period} "
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

    updated = service._run(caller.name, Action.UPDATE_KEY, audit, work)
    service.lifecycle.wake()
    return updated


def rotate_due_keys(service: KeyManagementService, refused: set[str]) -> int:
    """Rotates every key whose automatic rotation is due; returns how many this replica did.
    A key whose row fails its integrity check is audited once, added to `refused` and then
    left alone by this process."""
    try:
        with service._sessions() as session:
            due = Repository(session, service._integrity).due_rotations(svc.now_us(), DUE_BATCH)
    except svc.DATABASE_ERRORS as error:
        log.warning("the scheduler could not read due rotations: %s", type(error).__name__)
        return 0
    rotated = 0
    for key_name in due:
        if key_name in refused:
            continue
        try:
            rotated += _rotate_if_due(service, key_name)
        except KmsError as error:
            if error.status_name == "DATA_LOSS":
                refused.add(key_name)
            log.error(
                "the automatic rotation of %s was not made: %s (%s)",
                key_name,
                error.message,
                error.reason,
            )
    return rotated


def _rotate_if_due(service: KeyManagementService, key_name: str) -> int:
    audit = svc.AuditContext(key_name=key_name)

    def work(repo: Repository) -> int:
        key = svc._existing_key(repo, key_name, for_update=True)
        now = svc.now_us()
        period = key.rotation_period_us
        if key.next_rotation_us is None or key.next_rotation_us > now or period is None:
            return 0  # another replica rotated it, or the period was changed meanwhile
        version = key.last_version + 1
        material = crypto.new_secret_buffer()
        try:
            wrapped = service._root_key.wrap_version_material(key_name, version, material)
        finally:
            crypto.wipe(material)
        repo.add_version(
            KeyVersionRow(
                key_name=key_name,
                version=version,
                state=VersionState.ENABLED,
                origin=VersionOrigin.GENERATED,
                wrapped_material=wrapped,
                created_us=now,
                destroyed_us=None,
            )
        )
        previous = key.active_version
        key.last_version = version
        key.active_version = version
        key.next_rotation_us = now + period
        audit.version = audit.to_version = version
        audit.from_version = previous or 0
        audit.detail = (
            f"automatic rotation (every {period // 1_000_000}s): origin=generated, activated; "
            f"next at {svc.format_time_us(key.next_rotation_us)} "
            f"(next_rotation_us={key.next_rotation_us})"
        )
        repo.flush()
        svc._append_audit(
            repo,
            time_us=now,
            actor=model.SCHEDULER,
            action=Action.REGISTER_VERSION,
            outcome=Outcome.ALLOWED,
            status_code="OK",
            **asdict(audit),
        )
        return 1

    done = service._run(
        model.SCHEDULER, Action.REGISTER_VERSION, audit, work, audit_on_success=False
    )
    if done:
        log.info("rotated %s automatically", key_name)
    return done
