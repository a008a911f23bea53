"""Metrics, one structured log line per call, request ids, and the kms-server process wiring."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kms.v1 import kms_pb2, kms_pb2_grpc
from server.api.observability import JsonFormatter
from server.policy import hash_token
from tests.conftest import RunningKms, start_kms
from tests.integration.hardening_support import metric, scrape
from tests.integration.kms_helpers import KEY, issue, last_event, register, rotate

CALL_FIELDS = {"method", "actor", "status", "reason", "duration_ms", "request_id", "peer"}


@pytest.fixture
def observed_kms(tmp_path: Path, database_url: str) -> Iterator[RunningKms]:
    running = start_kms(tmp_path / "kms", database_url, metrics_listen="127.0.0.1:0")
    try:
        yield running
    finally:
        running.close()


def _call_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.call for r in caplog.records if r.name == "kms.call"]  # type: ignore[attr-defined]


def test_each_call_logs_exactly_one_line_with_its_fields(
    observed_kms: RunningKms, caplog: pytest.LogCaptureFixture
) -> None:
    kms = observed_kms
    channel = grpc.insecure_channel(kms.address)
    raw = kms_pb2_grpc.KeyManagementServiceStub(channel)
    try:
        with caplog.at_level(logging.INFO, logger="kms.call"):
            _, call = raw.RegisterKeyVersion.with_call(
                kms_pb2.RegisterKeyVersionRequest(key_name=KEY, activate_first_version=True),
                metadata=(
                    ("authorization", f"Bearer {kms.tokens['admin']}"),
                    ("x-request-id", "req-from-client-1"),
                ),
            )
            assert ("x-request-id", "req-from-client-1") in call.trailing_metadata()
            with pytest.raises(grpc.RpcError) as refused:
                raw.ListKeys(
                    kms_pb2.ListKeysRequest(),
                    metadata=(("x-request-id", "not sane {json}"),),
                    timeout=10,
                )
            trailing = cast(grpc.Call, refused.value).trailing_metadata() or ()
            generated = str(dict(trailing)["x-request-id"])
            assert generated != "not sane {json}" and len(generated) == 32
            with pytest.raises(grpc.RpcError):
                rotate(kms.stub("backup"), 1)
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        channel.close()
    lines = _call_lines(caplog)
    assert [(line["method"], line["status"], line["actor"]) for line in lines] == [
        ("/kms.v1.KeyManagementService/RegisterKeyVersion", "OK", "dev-admin"),
        ("/kms.v1.KeyManagementService/ListKeys", "UNAUTHENTICATED", "anonymous"),
        ("/kms.v1.KeyManagementService/RotateActive", "PERMISSION_DENIED", "dev-backup"),
        ("/grpc.health.v1.Health/Check", "OK", "anonymous"),
    ]
    for line in lines:
        assert set(line) == CALL_FIELDS
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert str(line["peer"]).startswith("ipv4:127.0.0.1:")
    assert lines[0]["request_id"] == "req-from-client-1"
    assert lines[1]["request_id"] == generated
    assert lines[1]["reason"] == "CREDENTIALS_MISSING"
    assert lines[2]["reason"] == "PERMISSION_DENIED"
    # The JSON formatter turns such a record into one object on one line.
    record = next(r for r in caplog.records if r.name == "kms.call")
    formatted = JsonFormatter().format(record)
    assert "\n" not in formatted
    entry = json.loads(formatted)
    assert set(entry) >= CALL_FIELDS and entry["level"] == "INFO" and entry["logger"] == "kms.call"


def test_an_unauthenticated_call_is_audited_logged_counted_and_keeps_its_request_id(
    observed_kms: RunningKms, caplog: pytest.LogCaptureFixture
) -> None:
    kms = observed_kms
    with grpc.insecure_channel(kms.address) as channel:
        raw = kms_pb2_grpc.KeyManagementServiceStub(channel)
        with caplog.at_level(logging.INFO, logger="kms.call"), pytest.raises(grpc.RpcError) as e:
            raw.GetActiveKey(
                kms_pb2.GetActiveKeyRequest(key_name=KEY, backup_id="b-unauthenticated"),
                metadata=(("authorization", "Bearer not-a-token"), ("x-request-id", "req-anon-1")),
                timeout=10,
            )
    refused = cast(grpc.Call, e.value)
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("x-request-id", "req-anon-1") in (refused.trailing_metadata() or ())
    [line] = _call_lines(caplog)
    assert (line["status"], line["reason"], line["actor"], line["request_id"]) == (
        "UNAUTHENTICATED",
        "CREDENTIALS_INVALID",
        "anonymous",
        "req-anon-1",
    )
    event = last_event(kms, "data_key.issue")
    assert (event.actor, event.outcome, event.status_code) == (
        "anonymous",
        kms_pb2.AUDIT_OUTCOME_DENIED,
        "UNAUTHENTICATED",
    )
    samples = scrape(kms)
    assert metric(samples, "kms_calls_total", method="GetActiveKey", code="UNAUTHENTICATED") == 1
    assert (
        metric(samples, "kms_denials_total", code="UNAUTHENTICATED", reason="CREDENTIALS_INVALID")
        == 1
    )
    assert "not-a-token" not in caplog.text


def test_metrics_count_calls_latency_versions_rotations_and_denials(
    observed_kms: RunningKms,
) -> None:
    kms = observed_kms
    admin, backup = kms.stub("admin"), kms.stub("backup")
    register(admin, activate=True)
    register(admin)
    register(admin, "other-key")
    rotate(admin, 2)
    issue(backup, "b1")
    issue(backup, "b2")
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            rotate(backup, 1)
    with pytest.raises(grpc.RpcError):
        rotate(kms.stub(None), 1)
    samples = scrape(kms)
    assert metric(samples, "kms_calls_total", method="RegisterKeyVersion", code="OK") == 3
    assert metric(samples, "kms_calls_total", method="GetActiveKey", code="OK") == 2
    assert metric(samples, "kms_calls_total", method="RotateActive", code="PERMISSION_DENIED") == 3
    assert metric(samples, "kms_call_duration_seconds_count", method="GetActiveKey") == 2
    assert (
        metric(samples, "kms_call_duration_seconds_bucket", method="GetActiveKey", le="+Inf") == 2
    )
    assert metric(samples, "kms_rotations_total") == 1
    assert (
        metric(samples, "kms_denials_total", code="PERMISSION_DENIED", reason="PERMISSION_DENIED")
        == 3
    )
    assert (
        metric(samples, "kms_denials_total", code="UNAUTHENTICATED", reason="CREDENTIALS_MISSING")
        == 1
    )
    assert metric(samples, "kms_key_active_version", key=KEY) == 2
    assert metric(samples, "kms_key_active_version", key="other-key") == 0
    assert metric(samples, "kms_audit_write_failures_total") == 0
    # Rotating again shows at the next scrape: the gauge reads the database.
    rotate(admin, 1)
    assert metric(scrape(kms), "kms_key_active_version", key=KEY) == 1


def test_metrics_are_off_by_default(kms: RunningKms) -> None:
    assert kms.server.metrics is None and kms.server.metrics_port is None


def test_kms_server_process_logs_json_and_reloads_its_policy_on_sighup(tmp_path: Path) -> None:
    """The real process: JSON log lines on stderr, SIGHUP reloads, SIGTERM stops cleanly."""
    data_dir, ready = tmp_path / "kms", tmp_path / "ready"
    # A file, not a pipe: a pipe nobody reads fills up and blocks the server's logging.
    log_file = (tmp_path / "stderr.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.main",
            "--dev",
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
            "--log-format",
            "json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log_file,
        cwd=Path(__file__).resolve().parents[2],
        env={k: v for k, v in os.environ.items() if not k.startswith("KMS_")},
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None, (tmp_path / "stderr.log").read_text()
            assert time.monotonic() < deadline, "kms-server did not start"
            time.sleep(0.05)
        address = ready.read_text()
        token = "sighup-added-token-0123456789"
        with grpc.insecure_channel(address) as channel:
            stub = kms_pb2_grpc.KeyManagementServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)

            def list_keys() -> grpc.StatusCode:
                try:
                    stub.ListKeys(kms_pb2.ListKeysRequest(), metadata=metadata, timeout=5)
                except grpc.RpcError as error:
                    code: grpc.StatusCode = error.code()
                    return code
                return grpc.StatusCode.OK

            assert list_keys() == grpc.StatusCode.UNAUTHENTICATED
            with (data_dir / "policy.toml").open("a") as policy:
                policy.write(
                    f'\n[principals.late-admin]\nauth = ["token"]\n'
                    f'token_sha256 = ["{hash_token(token)}"]\n'
                    '[[principals.late-admin.grants]]\nroles = ["admin"]\nkeys = ["*"]\n'
                )
            process.send_signal(signal.SIGHUP)
            while list_keys() != grpc.StatusCode.OK:
                assert time.monotonic() < deadline, "the SIGHUP reload did not take effect"
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log_file.close()
    stderr = (tmp_path / "stderr.log").read_text()
    assert process.returncode == 0, stderr
    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert entries, "no log lines"
    messages = [entry["message"] for entry in entries]
    assert any("policy reloaded" in message for message in messages)
    calls = [entry for entry in entries if entry["logger"] == "kms.call"]
    assert [c["status"] for c in calls] == ["UNAUTHENTICATED"] * (len(calls) - 1) + ["OK"]
    assert calls[-1]["actor"] == "late-admin"
    assert token not in stderr
