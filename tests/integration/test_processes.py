"""`--processes N`: one supervisor, N kms-server processes on one port (SO_REUSEPORT)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kms.v1 import kms_pb2, kms_pb2_grpc
from server.db.engine import sqlite_url
from tests.conftest import KmsStub
from tests.integration.cluster import (
    Replica,
    Secrets,
    audit_events,
    code_of,
    migrate,
    reason_of,
    register,
    verify_chain,
    wait_for,
)

PROCESSES = 2
CONNECTIONS = 16


@dataclass
class Supervised(Replica):
    metrics_port: int = 0


@pytest.fixture
def supervised(tmp_path: Path, database_url: str) -> Iterator[Supervised]:
    url = database_url or sqlite_url(str(tmp_path / "kms.sqlite3"))
    if database_url:
        migrate(url)  # a shared database is migrated deliberately
    metrics_port = _free_port()
    server = Supervised(
        "supervised",
        url,
        Secrets.create(tmp_path / "secrets"),
        tmp_path / "server",
        extra_args=["--processes", str(PROCESSES), "--metrics-listen", f"127.0.0.1:{metrics_port}"],
        metrics_port=metrics_port,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_the_processes_share_the_port_the_database_and_the_audit_chain(
    supervised: Supervised,
) -> None:
    children = _children(supervised)
    assert len(children) == PROCESSES, supervised.log()
    register(supervised.stub("admin"), "tenant", 1)
    stubs = _separate_connections(supervised, "backup")
    issued: dict[str, bytes] = {}
    lock = threading.Lock()

    def issue_ten(stub: KmsStub) -> None:
        for _ in range(10):
            backup_id = f"b-{uuid.uuid4()}"
            reply = stub.GetActiveKey(
                kms_pb2.GetActiveKeyRequest(key_name="tenant", backup_id=backup_id)
            )
            with lock:
                issued[backup_id] = reply.data_key

    threads = [threading.Thread(target=issue_ten, args=(stub,)) for stub in stubs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(issued) == CONNECTIONS * 10

    # The kernel spread the connections: every process holds some of them.
    port = int(supervised.address.rpartition(":")[2])
    held = {pid: _established_connections(pid, port) for pid in children}
    assert all(count > 0 for count in held.values()), held

    restore = supervised.stub("restore")
    for backup_id, data_key in issued.items():
        reply = restore.ResolveKeyForBackup(kms_pb2.ResolveKeyForBackupRequest(backup_id=backup_id))
        assert reply.data_key == data_key
    auditor = supervised.stub("auditor")
    assert verify_chain(auditor).intact
    issues = [e for e in audit_events(auditor) if e.action == "data_key.issue"]
    assert len(issues) == len(issued)

    # The supervisor serves the sum of every process's metrics.
    metrics = _metrics(supervised)
    assert _sample(metrics, 'kms_calls_total{code="OK",method="GetActiveKey"}') == len(issued)


def test_sighup_reloads_every_process(supervised: Supervised) -> None:
    register(supervised.stub("admin"), "tenant", 1)
    stubs = _separate_connections(supervised, "backup")
    for stub in stubs:
        stub.GetActiveKey(kms_pb2.GetActiveKeyRequest(key_name="tenant", backup_id=_new_id()))
    # Revoke the backup token: drop its digest from the policy.
    policy = supervised.secrets.policy_file
    digest = hashlib.sha256(supervised.secrets.tokens["backup"].encode()).hexdigest()
    policy.write_text(policy.read_text().replace(digest, "0" * 64))
    assert supervised.process is not None
    supervised.process.send_signal(signal.SIGHUP)

    def every_connection_refuses() -> bool:
        for stub in stubs:
            try:
                stub.GetActiveKey(
                    kms_pb2.GetActiveKeyRequest(key_name="tenant", backup_id=_new_id())
                )
                return False
            except grpc.RpcError as error:
                # Refused; past the failed-authentication burst, rate-limited at once.
                assert (code_of(error), reason_of(error)) in (
                    (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIALS_INVALID"),
                    (grpc.StatusCode.RESOURCE_EXHAUSTED, "UNAUTHENTICATED_RATE_LIMITED"),
                )
        return True

    wait_for(every_connection_refuses, 10, "every process to refuse the revoked token")


def test_a_process_that_dies_stops_the_server(supervised: Supervised) -> None:
    children = _children(supervised)
    os.kill(children[0], signal.SIGKILL)
    assert supervised.process is not None
    assert supervised.process.wait(timeout=30) == 1
    wait_for(lambda: not _alive(children[1]), 15, "the other process to stop")


def test_the_processes_stop_when_the_supervisor_is_killed(supervised: Supervised) -> None:
    children = _children(supervised)
    supervised.kill(signal.SIGKILL)
    wait_for(lambda: not any(_alive(pid) for pid in children), 15, "orphaned processes to stop")


def test_sigterm_stops_every_process_cleanly(supervised: Supervised) -> None:
    children = _children(supervised)
    supervised.stop()
    assert supervised.process is not None
    assert supervised.process.returncode == 0, supervised.log()
    assert not any(_alive(pid) for pid in children)


def _separate_connections(server: Replica, role: str) -> list[KmsStub]:
    """One TCP connection per stub (grpc would otherwise share one subchannel)."""
    metadata = (("authorization", f"Bearer {server.secrets.tokens[role]}"),)
    stubs = []
    for _ in range(CONNECTIONS):
        channel = grpc.insecure_channel(
            server.address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        server._channels.append(channel)
        stubs.append(KmsStub(kms_pb2_grpc.KeyManagementServiceStub(channel), metadata))
    return stubs


def _children(server: Replica) -> list[int]:
    assert server.process is not None
    parent = server.process.pid
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
            children.append(int(entry.name))
    return sorted(children)


def _established_connections(pid: int, port: int) -> int:
    """TCP connections in ESTABLISHED state on `port` among the process's open sockets."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _metrics(server: Supervised) -> str:
    port = server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _sample(metrics: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


def _new_id() -> str:
    return f"b-{uuid.uuid4()}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
