"""Helpers for the root-key rotation tests: the rewrap command as an operator runs it, a load
of data-key calls that records every failure, and what the database says about root keys."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text

from server.keystore import crypto
from tests.conftest import REPO, RunningKms, child_environment
from tests.integration.kms_helpers import database, issue, resolve


def new_root_key_file(path: Path) -> Path:
    crypto.RootKey.create(path)
    return path


def key_id(path: Path) -> str:
    return crypto.RootKey.load(path).key_id


def kms_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`kms-server ARGS` as a separate process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "server.main", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**child_environment(), **(env or {})},
        timeout=300,
    )


def rewrap(
    kms: RunningKms,
    keys: Sequence[str],
    *,
    batch_size: int = 2,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`kms-server rewrap-root-keys` on the server's database with these key flags."""
    completed = kms_server(
        "rewrap-root-keys",
        "--data-dir",
        str(kms.data_dir),
        "--database-url",
        kms.database_url,
        "--batch-size",
        str(batch_size),
        *keys,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr + completed.stdout
    return completed


def root_key_ids_of_blobs(kms: RunningKms) -> dict[str, int]:
    """How many root-wrapped blobs (version material and server secrets) each key id wraps."""
    counts: dict[str, int] = {}
    with database(kms) as connection:
        blobs = [
            bytes(row[0])
            for row in connection.execute(
                text("SELECT wrapped_material FROM key_versions WHERE wrapped_material IS NOT NULL")
            )
        ]
        blobs += [
            bytes(row[0])
            for row in connection.execute(
                text(
                    "SELECT value FROM server_meta WHERE name IN "
                    "('audit_mac_key', 'state_mac_key', 'audit_signing_key')"
                )
            )
        ]
    for blob in blobs:
        name = crypto.root_key_id_of(blob) or "format-1"
        counts[name] = counts.get(name, 0) + 1
    return counts


def check_value_names(kms: RunningKms) -> list[str]:
    with database(kms) as connection:
        rows = connection.execute(
            text("SELECT name FROM server_meta WHERE name LIKE 'root_key%' ORDER BY name")
        ).all()
    return [str(row[0]) for row in rows]


@dataclass
class DataKeyLoad:
    """Threads calling GetActiveKey and ResolveKeyForBackup until stopped; every failure and
    every data key that changed is kept."""

    servers: Sequence[RunningKms]
    known: dict[str, bytes]  # backup id -> its data key, issued before the load
    key_name: str
    threads_per_server: int = 2
    failures: list[str] = field(default_factory=list)
    calls: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> DataKeyLoad:
        for server in self.servers:
            for _ in range(self.threads_per_server):
                thread = threading.Thread(target=self._run, args=(server,), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def _run(self, server: RunningKms) -> None:
        backup, restorer = server.stub("backup"), server.stub("restore")
        ids = list(self.known)
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                backup_id = f"load-{uuid.uuid4().hex}"
                issued = issue(backup, backup_id, self.key_name)
                again = resolve(restorer, backup_id)
                old_id = ids[n % len(ids)]
                old = resolve(restorer, old_id)
                if again.data_key != issued.data_key or old.data_key != self.known[old_id]:
                    self._fail(f"a data key changed ({backup_id} or {old_id})")
            except Exception as error:  # every failure is what the test looks for
                self._fail(repr(error))
            with self._lock:
                self.calls += 3

    def _fail(self, what: str) -> None:
        with self._lock:
            self.failures.append(what)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
