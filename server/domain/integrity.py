"""Keyed integrity: MACs over audit events, the audit head and the rows that decide what
the server does.

The public SHA-256 chain (`audit_chain`) lets anyone check that the log hangs together,
but anyone who can write the database can also recompute it. These MACs are under keys
that exist only wrapped under the root key, so an attacker with the database but not the
root key can neither forge an event, move the head, nor change a key's active version or
a version's state without the next read or `VerifyAuditLog` noticing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from server.domain.errors import IntegrityFailure


def _encode(purpose: str, parts: Sequence[str | int | None]) -> bytes:
    """Length-prefixed, so no two different part lists encode alike; None is not ''."""
    chunks = [b"kms.v1/", purpose.encode()]
    for part in parts:
        if part is None:
            chunks.append(_NONE)
            continue
        encoded = str(part).encode()
        chunks.append(len(encoded).to_bytes(4, "big"))
        chunks.append(encoded)
    return b"".join(chunks)


_NONE = b"\xff\xff\xff\xff"  # no length prefix is this large


class AuditMac:
    """MACs of audit events (over their chain hash, which covers every field and the link
    to the event before) and of the head (its sequence and hash).

    On the data-key path, one per call: the key is absorbed once and the keyed state copied
    for each message, which costs a third of a one-shot `hmac.digest`.
    """

    def __init__(self, key: bytes | bytearray) -> None:
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "AuditMac(<hidden>)"

    def _mac(self, purpose: bytes, sequence: int, event_hash: str) -> str:
        mac = self._keyed.copy()
        # Fixed-length fields (8-byte sequence, 64 hex digits): no separators needed.
        mac.update(purpose + sequence.to_bytes(8, "big") + event_hash.encode("ascii"))
        return mac.hexdigest()

    def event(self, sequence: int, event_hash: str) -> str:
        return self._mac(b"kms.v1/audit-event:", sequence, event_hash)

    def head(self, sequence: int, event_hash: str) -> str:
        return self._mac(b"kms.v1/audit-head:", sequence, event_hash)

    def event_ok(self, sequence: int, event_hash: str, mac: str | None) -> bool:
        return mac is not None and hmac.compare_digest(self.event(sequence, event_hash), mac)

    def head_ok(self, sequence: int, event_hash: str, mac: str | None) -> bool:
        return mac is not None and hmac.compare_digest(self.head(sequence, event_hash), mac)


@dataclass(frozen=True)
class SealedKey:
    """What a `keys` row says, as its MAC covers it."""

    name: str
    active_version: int | None
    last_version: int
    created_us: int
    state_sequence: int | None
    # Automatic rotation (server.usecases.auto_rotation).
    rotation_period_us: int | None = None
    next_rotation_us: int | None = None


@dataclass(frozen=True)
class SealedVersion:
    """What a `key_versions` row says, as its MAC covers it. The wrapped material is bound to
    (key, version) by its own GCM tag; the MAC says whether it is there."""

    key_name: str
    version: int
    state: str
    origin: str
    has_material: bool
    created_us: int
    destroyed_us: int | None
    state_sequence: int | None
    # A scheduled destruction's due time and requester: what the scheduler acts on.
    destroy_due_us: int | None = None
    destroy_requested_by: str | None = None
    destroy_approved_by: str | None = None
    # How many data keys the version has wrapped (rotation by use).
    data_keys_wrapped: int = 0


@dataclass(frozen=True)
class SealedBinding:
    """What a `backup_bindings` row says beyond what its wrapped data key's associated data
    binds (backup id, key, version): who made it and when, which decides who may get its
    data key again (a retry)."""

    backup_id: str
    key_name: str
    version: int
    created_by: str
    created_us: int
    recovered: bool


Sealed = SealedKey | SealedVersion | SealedBinding


class StateSeal:
    """MACs of state rows, including the audit sequence of the event that last changed them,
    so `VerifyAuditLog` can match every row against the log."""

    # Verified (mac, state) pairs: a MAC cannot be forged, so a pair seen valid once is
    # valid for good, and the data-key path skips the HMAC for rows it has checked before.
    _VERIFIED_LIMIT = 4096

    def __init__(self, key: bytes | bytearray) -> None:
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)  # copied per MAC, as AuditMac
        self._verified: dict[str, Sealed] = {}

    def _mac(self, purpose: str, parts: Sequence[str | int | None]) -> str:
        mac = self._keyed.copy()
        mac.update(_encode(purpose, parts))
        return mac.hexdigest()

    def __repr__(self) -> str:
        return "StateSeal(<hidden>)"

    def key_mac(self, row: SealedKey) -> str:
        parts: tuple[str | int | None, ...] = (
            row.name,
            row.active_version,
            row.last_version,
            row.created_us,
            row.state_sequence,
        )
        if row.rotation_period_us is not None or row.next_rotation_us is not None:
            # Appended only when set, as for versions: older rows keep their MACs.
            parts = (*parts, row.rotation_period_us, row.next_rotation_us)
        return self._mac("state/key", parts)

    def version_mac(self, row: SealedVersion) -> str:
        parts: tuple[str | int | None, ...] = (
            row.key_name,
            row.version,
            row.state,
            row.origin,
            int(row.has_material),
            row.created_us,
            row.destroyed_us,
            row.state_sequence,
        )
        schedule = (row.destroy_due_us, row.destroy_requested_by, row.destroy_approved_by)
        if row.data_keys_wrapped:
            # The count comes after the schedule, both then always: three forms of distinct
            # lengths (8, 11 and 12 parts), which the length-prefixed encoding keeps apart.
            parts = (*parts, *schedule, row.data_keys_wrapped)
        elif any(part is not None for part in schedule):
            # Appended only when set, so rows sealed before scheduling existed keep their
            # MACs; the length-prefixed encoding keeps the two forms apart.
            parts = (*parts, *schedule)
        return self._mac("state/version", parts)

    def binding_mac(self, row: SealedBinding) -> str:
        parts = (
            row.backup_id,
            row.key_name,
            row.version,
            row.created_by,
            row.created_us,
            int(row.recovered),
        )
        return self._mac("state/binding", parts)

    def mac(self, row: Sealed) -> str:
        if isinstance(row, SealedKey):
            return self.key_mac(row)
        if isinstance(row, SealedVersion):
            return self.version_mac(row)
        return self.binding_mac(row)

    def seal(self, row: Sealed) -> str:
        """The row's MAC, remembered as verified (the server just wrote it)."""
        mac = self.mac(row)
        self._remember(mac, row)
        return mac

    def check(self, row: Sealed, mac: str | None) -> None:
        """Raises `IntegrityFailure` (DATA_LOSS / STATE_INTEGRITY) unless `mac` is the row's."""
        if mac is not None and self._verified.get(mac) == row:
            return
        expected = self.mac(row)
        if mac is None or not hmac.compare_digest(expected, mac):
            raise IntegrityFailure(
                "STATE_INTEGRITY",
                f"the stored state of {_describe(row)} failed its integrity check (the row was "
                "changed outside the server); nothing was done",
            )
        self._remember(mac, row)

    def _remember(self, mac: str, row: Sealed) -> None:
        if len(self._verified) >= self._VERIFIED_LIMIT:
            self._verified.clear()
        self._verified[mac] = row


def _describe(row: Sealed) -> str:
    if isinstance(row, SealedKey):
        return f"key {row.name}"
    if isinstance(row, SealedBinding):
        return f"the binding of backup {row.backup_id}"
    return f"{row.key_name} version {row.version}"
