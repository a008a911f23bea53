"""Real `kms-server` processes sharing one database, and a TCP proxy that can cut it off.

Used by the replica and fault tests. Every process is started with the same
root key and policy (made once with `server.devmode.bootstrap`), the way
replicas behind a load balancer are deployed.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from kms.v1 import kms_pb2, kms_pb2_grpc
from server import config, devmode
from tests.conftest import REPO, ROLES, KmsStub, child_environment, fresh_postgres_database

STARTUP_TIMEOUT = 30.0
KMS_SERVICE = "kms.v1.KeyManagementService"

T = TypeVar("T")


def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database (skips without KMS_TEST_DATABASE_URL), schema migrated."""
    for url in fresh_postgres_database():
        migrate(url)
        yield url


def migrate(database_url: str) -> subprocess.CompletedProcess[str]:
    """`kms-server migrate --database-url URL`, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "server.main", "migrate", "--database-url", database_url],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_environment(),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


@dataclass
class Secrets:
    """The root key, policy and one token per role that every replica shares."""

    directory: Path
    root_key_file: Path
    policy_file: Path
    tokens: dict[str, str]

    @classmethod
    def create(cls, directory: Path) -> Secrets:
        settings = config.parse(
            ["--dev", "--data-dir", str(directory), "--listen", "127.0.0.1:0"], environ={}
        )
        devmode.bootstrap(settings)
        tokens = {role: (directory / "tokens" / role).read_text().strip() for role in ROLES}
        return cls(directory, settings.root_key_file, settings.policy_file, tokens)


@dataclass
class Replica:
    """One `kms-server` process. `start()` again after `kill()` restarts it on a new port."""

    name: str
    database_url: str
    secrets: Secrets
    work_dir: Path
    process: subprocess.Popen[bytes] | None = None
    address: str = ""
    _channels: list[grpc.Channel] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)

    def start(self) -> Replica:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        ready = self.work_dir / "ready"
        ready.unlink(missing_ok=True)
        log = open(self.work_dir / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.main",
                "--data-dir",
                str(self.work_dir),
                "--database-url",
                self.database_url,
                "--root-key-file",
                str(self.secrets.root_key_file),
                "--policy-file",
                str(self.secrets.policy_file),
                "--insecure",
                "--listen",
                "127.0.0.1:0",
                "--ready-file",
                str(ready),
                "--log-level",
                "WARNING",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=REPO,
            env=child_environment(),
        )
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not ready.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{self.name} did not start: {self.log()}")
            time.sleep(0.05)
        self.address = ready.read_text().strip()
        return self

    def log(self) -> str:
        path = self.work_dir / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Channels stay open: calls on them fail with UNAVAILABLE, as a client would see."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: graceful shutdown."""
        self.kill(signal.SIGTERM)

    def channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return channel

    def stub(self, role: str) -> KmsStub:
        metadata = (("authorization", f"Bearer {self.secrets.tokens[role]}"),)
        return KmsStub(kms_pb2_grpc.KeyManagementServiceStub(self.channel()), metadata)

    def health(self, service: str = KMS_SERVICE) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel())
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def close_channels(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()


@contextlib.contextmanager
def replicas(
    database_url: str, secrets: Secrets, work_dir: Path, count: int = 2
) -> Iterator[list[Replica]]:
    """Starts `count` replicas on one database; always kills them afterwards."""
    started: list[Replica] = []
    try:
        for index in range(1, count + 1):
            replica = Replica(f"replica-{index}", database_url, secrets, work_dir / f"r{index}")
            started.append(replica)
            replica.start()
        yield started
    finally:
        for replica in started:
            replica.kill()
            replica.close_channels()


# Calls and errors


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    code: grpc.StatusCode = cast(grpc.Call, error).code()
    return code


def reason_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(cast(grpc.Call, error))
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def attempt(call: Callable[[], T]) -> T | grpc.RpcError:
    """The reply, or the error the call ended with."""
    try:
        return call()
    except grpc.RpcError as error:
        return error


def register(admin: KmsStub, key: str, versions: int) -> None:
    """Registers `versions` versions of a new key; the first is active."""
    for number in range(1, versions + 1):
        admin.RegisterKeyVersion(
            kms_pb2.RegisterKeyVersionRequest(key_name=key, activate_first_version=number == 1)
        )


def audit_events(auditor: KmsStub) -> list[Any]:
    events: list[Any] = []
    token = ""
    while True:
        page = auditor.ListAuditEvents(
            kms_pb2.ListAuditEventsRequest(page_size=1000, page_token=token)
        )
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


def verify_chain(auditor: KmsStub) -> Any:
    result = auditor.VerifyAuditLog(kms_pb2.VerifyAuditLogRequest())
    assert result.intact, (result.first_broken_sequence, result.problem)
    return result


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls until the condition holds; returns how long it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


# A TCP proxy between the server and its database


class TcpProxy:
    """Forwards 127.0.0.1:port to an upstream; `cut()` drops every connection and refuses new ones.

    While cut, connections are accepted and closed at once, so the server sees
    its database go away (not a hang); `restore()` forwards again.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._up = True
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        with self._lock:
            self._up = False
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def restore(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._listener)
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                _close(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets.update((client, server))
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, target), daemon=True).start()


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(target)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
