"""Fail closed: a call whose audit event cannot be written does not happen.

Also the limits: request size, name and reason lengths, backup-id format,
concurrent calls, deadlines.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kms.v1 import kms_pb2
from tests.conftest import RunningKms, start_kms
from tests.integration.hardening_support import (
    audit_count,
    audit_inserts_fail,
    metric,
    scrape,
    snapshot,
)
from tests.integration.kms_helpers import (
    KEY,
    active_version,
    expect_error,
    issue,
    reason_of,
    register,
    resolve,
    rotate,
    verify,
)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def observed_kms(tmp_path: Path, database_url: str) -> Iterator[RunningKms]:
    running = start_kms(tmp_path / "kms", database_url, metrics_listen="127.0.0.1:0")
    try:
        yield running
    finally:
        running.close()


def test_a_call_whose_audit_event_cannot_be_written_changes_nothing(
    observed_kms: RunningKms,
) -> None:
    kms = observed_kms
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    register(admin)
    issue(backup, "kept-backup")
    before, events_before = snapshot(kms), audit_count(kms)

    with audit_inserts_fail(kms):
        expect_error(
            lambda: rotate(admin, 2, reason="audit down"), UNAVAILABLE, "AUDIT_UNAVAILABLE"
        )
        expect_error(lambda: issue(backup, "new-backup"), UNAVAILABLE, "AUDIT_UNAVAILABLE")
        expect_error(lambda: resolve(restore, "kept-backup"), UNAVAILABLE, "AUDIT_UNAVAILABLE")
        # Denials are audited too: a denial that cannot be recorded is not answered as a denial.
        expect_error(lambda: rotate(backup, 2), UNAVAILABLE, "AUDIT_UNAVAILABLE")
        expect_error(lambda: rotate(kms.stub(None), 2), UNAVAILABLE, "AUDIT_UNAVAILABLE")
        expect_error(
            lambda: admin.DestroyKeyVersion(
                kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=2)
            ),
            UNAVAILABLE,
            "AUDIT_UNAVAILABLE",
        )
        assert snapshot(kms) == before
        assert audit_count(kms) == events_before

    samples = scrape(kms)
    assert metric(samples, "kms_audit_write_failures_total") == 6
    assert metric(samples, "kms_calls_total", method="RotateActive", code="UNAVAILABLE") == 3
    # Once the audit log can be written again, everything works and the chain is intact.
    assert active_version(admin) == 1
    rotate(admin, 2, reason="audit back")
    assert active_version(admin) == 2
    assert issue(backup, "new-backup").version == 2
    assert verify(kms).intact


def test_audit_failures_are_logged(kms: RunningKms, caplog: pytest.LogCaptureFixture) -> None:
    admin = kms.stub("admin")
    register(admin, activate=True)
    with audit_inserts_fail(kms), caplog.at_level("ERROR", logger="server.service"):
        expect_error(lambda: register(admin), UNAVAILABLE, "AUDIT_UNAVAILABLE")
    assert any("audit event not written" in r.getMessage() for r in caplog.records)


def test_integrity_failures_are_logged_and_counted(
    observed_kms: RunningKms, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import text

    from tests.integration.kms_helpers import database

    kms = observed_kms
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    issue(backup, "b1")
    with database(kms) as connection:
        blob = connection.execute(
            text("SELECT wrapped_data_key FROM backup_bindings WHERE backup_id = 'b1'")
        ).scalar_one()
        flipped = bytes(blob[:-1]) + bytes([blob[-1] ^ 1])
        connection.execute(
            text("UPDATE backup_bindings SET wrapped_data_key = :b WHERE backup_id = 'b1'"),
            {"b": flipped},
        )
    with caplog.at_level("ERROR"):
        expect_error(lambda: resolve(restore, "b1"), grpc.StatusCode.DATA_LOSS)
    assert any("integrity failure" in r.getMessage() for r in caplog.records)
    samples = scrape(kms)
    assert metric(samples, "kms_integrity_failures_total", reason="WRAPPED_BLOB_INTEGRITY") == 1


# Limits


def test_a_request_over_the_size_limit_is_refused(kms: RunningKms) -> None:
    admin = kms.stub("admin")
    huge = kms_pb2.RotateActiveRequest(key_name=KEY, to_version=1, reason="x" * (65 * 1024))
    with pytest.raises(grpc.RpcError) as caught:
        admin.RotateActive(huge)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    register(admin, activate=True)  # still serving


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (kms_pb2.RegisterKeyVersionRequest(key_name="k" * 129), "KEY_NAME_INVALID"),
        (kms_pb2.RegisterKeyVersionRequest(key_name="-starts-badly"), "KEY_NAME_INVALID"),
        (
            kms_pb2.RotateActiveRequest(key_name=KEY, to_version=1, reason="r" * 1025),
            "REASON_TOO_LONG",
        ),
        (kms_pb2.RotateActiveRequest(key_name=KEY, to_version=2**31), "VERSION_INVALID"),
        (kms_pb2.GetActiveKeyRequest(key_name=KEY, backup_id="b" * 129), "BACKUP_ID_INVALID"),
        (kms_pb2.GetActiveKeyRequest(key_name=KEY, backup_id="a/b"), "BACKUP_ID_INVALID"),
        (kms_pb2.ResolveKeyForBackupRequest(backup_id=""), "BACKUP_ID_MISSING"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_limits_are_refused_with_a_clear_error(
    kms: RunningKms, request_: object, reason: str
) -> None:
    role = {
        "RegisterKeyVersionRequest": "admin",
        "RotateActiveRequest": "admin",
        "GetActiveKeyRequest": "backup",
        "ResolveKeyForBackupRequest": "restore",
    }[type(request_).__name__]
    method = type(request_).__name__.removesuffix("Request")
    if method == "GetActiveKey" or method == "ResolveKeyForBackup":
        register(kms.stub("admin"), activate=True)
    stub = kms.stub(role)
    expect_error(lambda: getattr(stub, method)(request_), grpc.StatusCode.INVALID_ARGUMENT, reason)


def _hold_sqlite_write_lock(kms: RunningKms, seconds: float) -> threading.Thread:
    """Holds SQLite's write lock from outside the server for a while (a slow writer)."""
    locked = threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(kms.data_dir / "kms.sqlite3", isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(seconds)
            connection.execute("ROLLBACK")
        finally:
            connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(5)
    return thread


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(response.status)


def test_calls_beyond_the_concurrency_cap_are_refused_not_queued(tmp_path: Path) -> None:
    kms = start_kms(tmp_path / "kms", max_concurrent_rpcs="1")
    try:
        admin, backup = kms.stub("admin"), kms.stub("backup")
        register(admin, activate=True)
        holder = _hold_sqlite_write_lock(kms, 1.5)
        slow: dict[str, object] = {}
        worker = threading.Thread(target=lambda: slow.update(answer=issue(backup, "slow-backup")))
        worker.start()
        time.sleep(0.4)  # the slow call is in progress, waiting for the write lock
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            issue(backup, "second-backup")
        # The pipeline refuses it before authentication, let alone the database.
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(caught.value) == "TOO_MANY_CALLS"
        assert time.monotonic() - started < 1.0, "refused at once, not queued"
        worker.join(10)
        holder.join(10)
        assert slow["answer"].version == 1  # type: ignore[attr-defined]
        assert issue(backup, "second-backup").version == 1
    finally:
        kms.close()


def test_deadlines_are_honoured_and_the_server_keeps_serving(tmp_path: Path) -> None:
    kms = start_kms(tmp_path / "kms")
    try:
        admin, backup = kms.stub("admin"), kms.stub("backup")
        register(admin, activate=True)
        expect_deadline = grpc.StatusCode.DEADLINE_EXCEEDED
        # The call waits on a slow writer holding the database: its deadline ends it.
        holder = _hold_sqlite_write_lock(kms, 1.0)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            backup.GetActiveKey(
                kms_pb2.GetActiveKeyRequest(key_name=KEY, backup_id="b1"), timeout=0.3
            )
        assert caught.value.code() == expect_deadline
        assert time.monotonic() - started < 0.9
        holder.join(10)
        assert _health(kms.address) == health_pb2.HealthCheckResponse.SERVING
        # A retry of the same backup id is idempotent, whether or not the late call committed.
        assert issue(backup, "b1").version == 1
    finally:
        kms.close()


def test_graceful_shutdown_reports_not_serving_and_finishes_in_flight_calls(
    tmp_path: Path,
) -> None:
    health_address = f"127.0.0.1:{_free_port()}"
    kms = start_kms(tmp_path / "kms", health_listen=health_address)
    stopped = False
    try:
        admin, backup = kms.stub("admin"), kms.stub("backup")
        register(admin, activate=True)
        assert _health(health_address) == health_pb2.HealthCheckResponse.SERVING
        holder = _hold_sqlite_write_lock(kms, 1.5)
        in_flight: dict[str, object] = {}
        worker = threading.Thread(
            target=lambda: in_flight.update(answer=issue(backup, "in-flight-backup"))
        )
        worker.start()
        time.sleep(0.3)
        stopper = threading.Thread(target=lambda: kms.server.stop(grace_seconds=10))
        stopper.start()
        time.sleep(0.3)
        # During the grace period: health says NOT_SERVING, new calls are refused.
        assert _health(health_address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            issue(backup, "too-late")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        worker.join(10)
        stopper.join(15)
        holder.join(10)
        stopped = True
        assert in_flight["answer"].version == 1  # type: ignore[attr-defined]
        assert not stopper.is_alive()
    finally:
        if not stopped:
            kms.close()
        else:
            for channel in kms._channels:
                channel.close()
