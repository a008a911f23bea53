"""Starts kms-server and the echo baseline as separate processes, as an operator would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 60.0
ROLES = ("admin", "backup", "restore", "auditor")


def child_environment() -> dict[str, str]:
    """This environment minus KMS_* settings, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@dataclass
class Process:
    """A server subprocess that wrote its address to a ready file."""

    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start(command: list[str], ready_file: Path, log_path: Path) -> Process:
    ready_file.unlink(missing_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=child_environment(), stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not ready_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"{command[2]} did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.02)
    return Process(ready_file.read_text().strip(), process, log_path)


@contextmanager
def echo_server(work: Path, processes: int = 1) -> Iterator[Process]:
    command = [sys.executable, "-m", "benchmarks.echo_server", "--listen", "127.0.0.1:0"]
    command += ["--processes", str(processes)]
    ready = work / "echo.ready"
    server = _start([*command, "--ready-file", str(ready)], ready, work / "echo.log")
    try:
        yield server
    finally:
        server.stop()


@dataclass
class KmsProcess(Process):
    data_dir: Path

    def token(self, role: str) -> str:
        return (self.data_dir / "tokens" / role).read_text().strip()

    def token_file(self, role: str) -> Path:
        return self.data_dir / "tokens" / role

    def log_offset(self) -> int:
        """Where the server's log ends now; `handler_seconds` reads what is written after."""
        return self.log_path.stat().st_size

    def handler_seconds(self, since: int, method: str) -> list[float]:
        """The server's own time for each `method` call logged after `since`.

        Each call's log line carries `duration_ms`: from the call entering the pipeline to
        its answer being ready (authentication, the use case and its group commit), without
        grpc's receive, dispatch and send. The log writer lingers between writes
        (`LogWriter.LINGER_SECONDS`), so the caller waits a little after its last call.
        """
        with open(self.log_path, "rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        suffix = f"/{method}"
        seconds = []
        for line in text.splitlines():
            if '"duration_ms"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line of something else
            if str(entry.get("method", "")).endswith(suffix):
                seconds.append(float(entry["duration_ms"]) / 1000)
        return seconds


# Root-key flags every kms-server gets (run.py's --root-key, --pkcs11-module, --pkcs11-pin-file).
ROOT_KEY_ARGS: list[str] = []


def start_kms(data_dir: Path, database_url: str = "", processes: int = 1) -> KmsProcess:
    """`kms-server --dev` on an ephemeral loopback port; SQLite in DATA_DIR unless a URL."""
    ready = data_dir.with_name(data_dir.name + ".ready")
    command = [sys.executable, "-m", "server.main", "--dev", "--data-dir", str(data_dir)]
    command += ["--listen", "127.0.0.1:0", "--ready-file", str(ready)]
    command += ["--processes", str(processes), *ROOT_KEY_ARGS]
    if database_url:
        command += ["--database-url", database_url]
    started = _start(command, ready, data_dir.with_name(data_dir.name + ".log"))
    return KmsProcess(started.address, started.process, started.log_path, data_dir)


@contextmanager
def kms_server(data_dir: Path, database_url: str = "", processes: int = 1) -> Iterator[KmsProcess]:
    server = start_kms(data_dir, database_url, processes)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def fresh_postgres_database(base_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on the server named by `base_url`; dropped afterwards."""
    admin_url = make_url(base_url).set(drivername="postgresql+psycopg")
    name = f"kms_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
