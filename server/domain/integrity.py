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
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from server.domain.errors import IntegrityFailure

_MAC_DIGEST = "sha256"


def _encode(purpose: str, parts: Sequence[str | int | None]) -> bytes:
    """Length-prefixed, so no two different part lists encode alike; None is not ''."""
    out = bytearray(b"kms.v1/" + purpose.encode())
    for part in parts:
        if part is None:
            out += b"\xff\xff\xff\xff"
            continue
        encoded = str(part).encode()
        out += struct.pack(">I", len(encoded)) + encoded
    return bytes(out)


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
    # Automatic rotation (server.usecases.rotation_schedule).
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


class StateSeal:
    """MACs of state rows, including the audit sequence of the event that last changed them,
    so `VerifyAuditLog` can match every row against the log."""

    # Verified (mac, state) pairs: a MAC cannot be forged, so a pair seen valid once is
    # valid for good, and the data-key path skips the HMAC for rows it has checked before.
    _VERIFIED_LIMIT = 4096

    def __init__(self, key: bytes | bytearray) -> None:
        self._key = key
        self._verified: dict[str, SealedKey | SealedVersion] = {}

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
        return hmac.digest(self._key, _encode("state/key", parts), _MAC_DIGEST).hex()

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
        if any(part is not None for part in schedule):
            # Appended only when set, so rows sealed before scheduling existed keep their
            # MACs; the length-prefixed encoding keeps the two forms apart.
            parts = (*parts, *schedule)
        return hmac.digest(self._key, _encode("state/version", parts), _MAC_DIGEST).hex()

    def check(self, row: SealedKey | SealedVersion, mac: str | None) -> None:
        """Raises `IntegrityFailure` (DATA_LOSS / STATE_INTEGRITY) unless `mac` is the row's."""
        if mac is not None and self._verified.get(mac) == row:
            return
        expected = self.key_mac(row) if isinstance(row, SealedKey) else self.version_mac(row)
        if mac is None or not hmac.compare_digest(expected, mac):
            raise IntegrityFailure(
                "STATE_INTEGRITY",
                f"the stored state of {_describe(row)} failed its integrity check (the row was "
                "changed outside the server); nothing was done",
            )
        if len(self._verified) >= self._VERIFIED_LIMIT:
            self._verified.clear()
        self._verified[mac] = row


def _describe(row: SealedKey | SealedVersion) -> str:
    if isinstance(row, SealedKey):
        return f"key {row.name}"
    return f"{row.key_name} version {row.version}"
