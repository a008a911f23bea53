"""The external audit sink (`--audit-file`): every event, one JSON line, fsynced before the
call it records is answered, like Vault's file audit device.

Lines are written inside the event's database transaction, just before the commit, so
an event that cannot reach the file fails its call closed, changing nothing. If the
commit itself then fails, the file holds an event the database does not: the next
event reuses its sequence, and only the line whose hash the following line links to
belongs to the chain.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class AuditSinkError(Exception):
    """The audit file cannot be written: the call must fail closed."""


class AuditFile:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._fd = self._open()

    def _open(self) -> int:
        try:
            return os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise AuditSinkError(f"cannot open audit file {self._path}: {error.strerror}") from None

    def __call__(self, events: Sequence[Mapping[str, Any]]) -> None:
        data = "".join(
            json.dumps(event, ensure_ascii=True, separators=(",", ":"), default=str) + "\n"
            for event in events
        ).encode("ascii")
        with self._lock:
            try:
                written = os.write(self._fd, data)
                if written != len(data):
                    raise OSError(28, "short write")
                os.fsync(self._fd)
            except OSError as error:
                log.error("audit file %s not written: %s", self._path, error.strerror)
                raise AuditSinkError(
                    f"the audit file cannot be written: {error.strerror}"
                ) from None

    def reopen(self) -> bool:
        """After log rotation (SIGHUP): appends to a new file at the path from now on."""
        try:
            fd = self._open()
        except AuditSinkError as error:
            log.error("%s; still writing to the file opened before", error)
            return False
        with self._lock:
            old, self._fd = self._fd, fd
        os.close(old)
        return True

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)
