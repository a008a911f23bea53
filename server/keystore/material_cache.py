"""Unwrapped version material kept in memory, and wiped when it goes.

Entries are keyed by the wrapped blob read in the caller's own transaction, so a
destroyed (blob erased) or disabled (state checked first) version is never served
from here, on this replica or any other. What the cache adds is a bound on how long
material stays in memory: an entry leaves at once when this process destroys the
version, and after `max_age_seconds` on every replica; either way its buffer is
overwritten shortly after (one sweep later, so a call still using it finishes first).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from server.keystore.crypto import wipe

DEFAULT_MAX_AGE_SECONDS = 60.0
MAX_ENTRIES = 4096  # 32 bytes of material each


@dataclass
class _Entry:
    blob: bytes
    material: bytearray
    expires: float


class MaterialCache:
    def __init__(self, max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS) -> None:
        self._max_age = max_age_seconds
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._lock = threading.Lock()
        # Evicted, wiped at the next sweep: a call that took the buffer just before is done.
        self._to_wipe: list[bytearray] = []
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def get(self, key_name: str, version: int, blob: bytes) -> bytearray | None:
        entry = self._entries.get((key_name, version))
        if entry is None or entry.blob != blob or entry.expires < time.monotonic():
            return None
        return entry.material

    def put(self, key_name: str, version: int, blob: bytes, material: bytearray) -> None:
        if self._max_age <= 0:
            self._retire(material)
            return
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                for entry in self._entries.values():
                    self._to_wipe.append(entry.material)
                self._entries.clear()
            old = self._entries.get((key_name, version))
            if old is not None and old.material is not material:
                self._to_wipe.append(old.material)
            self._entries[(key_name, version)] = _Entry(
                blob, material, time.monotonic() + self._max_age
            )

    def evict(self, key_name: str, version: int) -> None:
        with self._lock:
            entry = self._entries.pop((key_name, version), None)
            if entry is not None:
                self._to_wipe.append(entry.material)

    def sweep(self) -> None:
        """Wipes what the previous sweep (or an eviction) let go, then lets expired entries go."""
        now = time.monotonic()
        with self._lock:
            retired, self._to_wipe = self._to_wipe, []
            for name, entry in list(self._entries.items()):
                if entry.expires < now:
                    del self._entries[name]
                    self._to_wipe.append(entry.material)
        for material in retired:
            wipe(material)

    def _retire(self, material: bytearray) -> None:
        with self._lock:
            self._to_wipe.append(material)

    def start_sweeping(self) -> None:
        """A daemon thread sweeps every second (or more often for a short `max_age`)."""
        interval = min(1.0, max(self._max_age / 4, 0.05))

        def run() -> None:
            while not self._stop.wait(interval):
                self.sweep()

        self._sweeper = threading.Thread(target=run, name="kms-material-sweeper", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        """Stops the sweeper and wipes everything."""
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        with self._lock:
            for entry in self._entries.values():
                self._to_wipe.append(entry.material)
            self._entries.clear()
        self.sweep()
