"""What the audit log says the state is, checked against what the database holds.

A row's MAC proves the server wrote it, but not that it is the newest thing the server
wrote: someone with the database can put back an older, validly MAC'd row (undo a
rotation, revive a destroyed version). Replaying the log's state changes and comparing
each row's content and `state_sequence` with the last event that changed it catches that.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from server.domain.errors import IntegrityFailure
from server.domain.integrity import SealedKey, SealedVersion, StateSeal
from server.domain.model import Action, AuditEvent, Outcome, VersionState

_VERSION_STATES: dict[str, VersionState] = {
    Action.DISABLE_VERSION: VersionState.DISABLED,
    Action.ENABLE_VERSION: VersionState.ENABLED,
}
# How a scheduling event names the due time it set (see server.usecases.lifecycle).
DUE_PATTERN = re.compile(r"destroy_due_us=(\d+)")


# A destruction's due time, requester and approver, as a version row holds them.
Schedule = tuple[int | None, str | None, str | None]
_NO_SCHEDULE: Schedule = (None, None, None)


def version_value(state: str, schedule: Schedule, data_keys_wrapped: int = 0) -> str:
    """What the replay compares of a version row: its state, a destruction's schedule, and
    how many data keys it has wrapped."""
    value = state
    if schedule != _NO_SCHEDULE:
        due_us, requested_by, approved_by = schedule
        approval = f", approved by {approved_by}" if approved_by is not None else ""
        value = f"{state} (destruction due {due_us}, asked by {requested_by}{approval})"
    if data_keys_wrapped:
        value += f", {data_keys_wrapped} data keys wrapped"
    return value


# How an event names a version's count of wrapped data keys after it (server.usecases).
WRAPPED_FIELD = "data_keys_wrapped"


@dataclass
class _Expected:
    value: int | str | None  # a key's active version, or a version's state
    changed_by: int  # the sequence of the last event that changed the row


@dataclass(frozen=True)
class StoredRow:
    """A key or version row as stored, with its MAC."""

    sealed: SealedKey | SealedVersion
    mac: str | None


class StateReplay:
    """Follows the events as they stream past (`watch`), keeping the last change of each row."""

    def __init__(self) -> None:
        self.keys: dict[str, _Expected] = {}
        self.versions: dict[tuple[str, int], _Expected] = {}
        self._schedules: dict[tuple[str, int], Schedule] = {}
        self._states: dict[tuple[str, int], str] = {}
        self._wrapped: dict[tuple[str, int], int] = {}
        self._active: dict[str, int | None] = {}
        self._rotations: dict[str, Rotation] = {}
        self.keyed_from = 0  # the event that sealed every row, when the state key was made

    def watch(self, events: Iterable[AuditEvent]) -> Iterator[AuditEvent]:
        for event in events:
            self._record(event)
            yield event

    def _record(self, event: AuditEvent) -> None:
        if event.outcome != Outcome.ALLOWED:
            return
        sequence, name = event.sequence, event.key_name
        if event.action == Action.ISSUE_DATA_KEY:
            # The commonest event by far: only the text test unless it wrapped a new key.
            if WRAPPED_FIELD in event.detail:
                self._version(event, wrapped=_field(event, WRAPPED_FIELD))
        elif event.action == Action.REWRAP_BACKUPS:
            if WRAPPED_FIELD in event.detail:
                target = dataclasses.replace(event, version=event.to_version)
                self._version(target, wrapped=_field(event, WRAPPED_FIELD))
        elif event.action == Action.START_KEYED_AUDIT:
            self.keyed_from = sequence
        elif event.action == Action.REGISTER_VERSION:
            activated = event.to_version == event.version
            current = self._active.get(name)
            # An automatic rotation names the key's next one.
            rotation = self._rotations.get(name, _NO_ROTATION)
            next_rotation = _field(event, "next_rotation_us")
            if next_rotation is not None:
                rotation = (rotation[0], next_rotation)
            self._key(event, event.version if activated else current, rotation)
            self._version(event, VersionState.ENABLED)
        elif event.action == Action.ROTATE:
            self._key(event, event.to_version)
        elif event.action == Action.UPDATE_KEY:
            rotation = (_field(event, "rotation_period_us"), _field(event, "next_rotation_us"))
            self._key(event, self._active.get(name), rotation)
        elif event.action in _VERSION_STATES:
            self._version(event, _VERSION_STATES[event.action])
        elif event.action == Action.SCHEDULE_DESTROY:
            due = _due(event)
            # Without a due time the request waits for a second admin's approval.
            state = VersionState.DESTROY_SCHEDULED if due else VersionState.PENDING_APPROVAL
            self._version(event, state, (due, event.actor, None))
        elif event.action == Action.APPROVE_DESTROY:
            requested_by = self._schedules.get((name, event.version), _NO_SCHEDULE)[1]
            schedule = (_due(event), requested_by, event.actor)
            self._version(event, VersionState.DESTROY_SCHEDULED, schedule)
        elif event.action == Action.CANCEL_DESTROY:
            self._version(event, VersionState.DISABLED, _NO_SCHEDULE)
        elif event.action == Action.DESTROY_VERSION:
            # Carrying out a schedule keeps its due time, requester and approver on the row.
            self._version(event, VersionState.DESTROYED)

    def _key(self, event: AuditEvent, active: int | None, rotation: Rotation | None = None) -> None:
        name = event.key_name
        if rotation is not None:
            self._rotations[name] = rotation
        self._active[name] = active
        kept = self._rotations.get(name, _NO_ROTATION)
        self.keys[name] = _Expected(key_value(active, kept), event.sequence)

    def _version(
        self,
        event: AuditEvent,
        state: VersionState | None = None,
        schedule: Schedule | None = None,
        *,
        wrapped: int | None = None,
    ) -> None:
        """The event changed the version it names: its state, schedule or count, as given."""
        identity = (event.key_name, event.version)
        if state is not None:
            self._states[identity] = state
        if schedule is not None:
            self._schedules[identity] = schedule
        if wrapped is not None:
            self._wrapped[identity] = wrapped
        value = version_value(
            self._states.get(identity, ""),
            self._schedules.get(identity, _NO_SCHEDULE),
            self._wrapped.get(identity, 0),
        )
        self.versions[identity] = _Expected(value, event.sequence)

    def problems(
        self, keys: Sequence[StoredRow], versions: Sequence[StoredRow], seal: StateSeal
    ) -> Iterator[str]:
        """Every way the stored rows differ from what the log says, first to last."""
        seen_keys: set[str] = set()
        for row in keys:
            sealed = row.sealed
            assert isinstance(sealed, SealedKey)
            seen_keys.add(sealed.name)
            yield from self._row_problems(
                f"key {sealed.name}",
                "active version",
                key_value(
                    sealed.active_version, (sealed.rotation_period_us, sealed.next_rotation_us)
                ),
                sealed.state_sequence,
                self.keys.get(sealed.name),
                _mac_problem(row, seal),
            )
        seen_versions: set[tuple[str, int]] = set()
        for row in versions:
            sealed_version = row.sealed
            assert isinstance(sealed_version, SealedVersion)
            identity = (sealed_version.key_name, sealed_version.version)
            seen_versions.add(identity)
            yield from self._row_problems(
                f"{identity[0]} version {identity[1]}",
                "state",
                version_value(
                    sealed_version.state,
                    (
                        sealed_version.destroy_due_us,
                        sealed_version.destroy_requested_by,
                        sealed_version.destroy_approved_by,
                    ),
                    sealed_version.data_keys_wrapped,
                ),
                sealed_version.state_sequence,
                self.versions.get(identity),
                _mac_problem(row, seal),
            )
        for name in sorted(self.keys.keys() - seen_keys):
            yield f"key {name} is in the audit log but missing from the database (deleted)"
        for name, version in sorted(self.versions.keys() - seen_versions):
            yield (
                f"{name} version {version} is in the audit log but missing from the database "
                "(deleted)"
            )

    def _row_problems(
        self,
        what: str,
        field: str,
        value: int | str | None,
        state_sequence: int | None,
        expected: _Expected | None,
        mac_problem: str,
    ) -> Iterator[str]:
        if mac_problem:
            yield f"{what}: {mac_problem}"
            return
        if expected is None:
            yield f"{what} has no event in the audit log (it was written outside the server)"
            return
        if value != expected.value:
            yield (
                f"{what}: the {field} is {value}, but the audit log's event {expected.changed_by} "
                f"made it {expected.value}"
            )
        last_change = max(expected.changed_by, self.keyed_from)
        if state_sequence != last_change:
            yield (
                f"{what} was last changed by event {state_sequence} but the audit log's last "
                f"change to it is event {last_change} (an older row was put back)"
            )


def _mac_problem(row: StoredRow, seal: StateSeal) -> str:
    try:
        seal.check(row.sealed, row.mac)
    except IntegrityFailure:
        return "its row fails its MAC (it was changed outside the server)"
    return ""


def _due(event: AuditEvent) -> int | None:
    return _field(event, "destroy_due_us")


def _field(event: AuditEvent, name: str) -> int | None:
    """A number the event's detail states as `name=N` (see server.usecases)."""
    found = re.search(rf"\b{name}=(\d+)", event.detail)
    return int(found.group(1)) if found else None


# A key's automatic rotation: its period and the next time, as a key row holds them.
Rotation = tuple[int | None, int | None]
_NO_ROTATION: Rotation = (None, None)


def key_value(active: int | None, rotation: Rotation) -> int | str | None:
    """What the replay compares of a key row: its active version, and its rotation schedule."""
    if rotation == _NO_ROTATION:
        return active
    return f"{active} (rotation every {rotation[0]} us, next at {rotation[1]})"
