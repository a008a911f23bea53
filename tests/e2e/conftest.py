"""A real `kms-server --dev` subprocess, and a way to run the client programs as a user would."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, child_environment

STARTUP_TIMEOUT = 30.0


@dataclass
class DevServer:
    address: str
    data_dir: Path
    process: subprocess.Popen[bytes]

    def token_file(self, role: str) -> Path:
        return self.data_dir / "tokens" / role

    def run(
        self,
        module: str,
        *args: str,
        role: str | None = None,
        stdin: bytes | None = None,
        check: bool = False,
        addr: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `python -m client.<module> ARGS` against this server with the role's token."""
        connection = ["--addr", addr or self.address]
        if role is not None:
            connection += ["--token-file", str(self.token_file(role))]
        completed = subprocess.run(
            [sys.executable, "-m", f"client.{module}", *args, *connection],
            input=stdin if stdin is not None else b"",
            capture_output=True,
            cwd=REPO,
            env=child_environment(),
            timeout=120,
        )
        if check and completed.returncode != 0:
            pytest.fail(f"{module} {args} exited {completed.returncode}: {completed.stderr!r}")
        return completed


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[DevServer]:
    # Destroys at once (a zero delay, dev mode only); the lifecycle tests set a delay.
    with running_dev_server(tmp_path, "--destroy-delay", "0s") as server:
        yield server


@contextlib.contextmanager
def running_dev_server(tmp_path: Path, *extra_flags: str) -> Iterator[DevServer]:
    """`kms-server --dev` on a data directory in tmp_path (kept across restarts)."""
    data_dir = tmp_path / "kms-data"
    ready_file = tmp_path / "ready"
    ready_file.unlink(missing_ok=True)
    log = open(tmp_path / "server.log", "ab")  # noqa: SIM115  (closed in finally)
    dev_flags = ["--dev", "--data-dir", str(data_dir), "--ready-file", str(ready_file)]
    process = subprocess.Popen(
        [sys.executable, "-m", "server.main", *dev_flags, "--listen", "127.0.0.1:0", *extra_flags],
        cwd=REPO,
        env=child_environment(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not ready_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"kms-server did not start: {(tmp_path / 'server.log').read_text()}")
            time.sleep(0.05)
        yield DevServer(ready_file.read_text().strip(), data_dir, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
    assert process.returncode == 0, "kms-server did not stop cleanly on SIGTERM"
