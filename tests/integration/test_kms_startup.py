"""Starting the server: the root key must match the database; health and reflection are public."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from kms.v1 import kms_pb2
from server.keystore import crypto
from tests.conftest import RunningKms, start_kms
from tests.integration.kms_helpers import issue, register, resolve


def test_a_different_root_key_is_refused_at_start(kms: RunningKms, tmp_path: Path) -> None:
    register(kms.stub("admin"), activate=True)
    # Another data directory gets a new root key from dev mode, but uses the same database.
    with pytest.raises(crypto.RootKeyError, match="does not match"):
        start_kms(tmp_path / "other", kms.database_url)
    # The running server is unaffected.
    assert issue(kms.stub("backup"), "b1").version == 1


def test_a_replaced_root_key_file_is_refused_at_restart(tmp_path: Path, database_url: str) -> None:
    data_dir = tmp_path / "kms"
    first = start_kms(data_dir, database_url)
    register(first.stub("admin"), activate=True)
    first.close()
    root_key = data_dir / "root.key"
    original = root_key.read_bytes()
    root_key.write_bytes(os.urandom(32))
    with pytest.raises(crypto.RootKeyError):
        start_kms(data_dir, database_url)
    root_key.write_bytes(original)
    second = start_kms(data_dir, database_url)
    try:
        assert issue(second.stub("backup"), "after-restart").version == 1
    finally:
        second.close()


def test_data_keys_survive_a_restart_with_the_same_root_key(
    tmp_path: Path, database_url: str
) -> None:
    data_dir = tmp_path / "kms"
    first = start_kms(data_dir, database_url)
    register(first.stub("admin"), activate=True)
    issued = issue(first.stub("backup"), "b1")
    first.close()
    second = start_kms(data_dir, database_url)
    try:
        assert resolve(second.stub("restore"), "b1").data_key == issued.data_key
        result = second.stub("auditor").VerifyAuditLog(kms_pb2.VerifyAuditLogRequest())
        assert result.intact
    finally:
        second.close()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_root_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    data_dir = tmp_path / "kms"
    start_kms(data_dir).close()
    (data_dir / "root.key").chmod(mode)
    with pytest.raises(crypto.RootKeyError, match="chmod 600"):
        start_kms(data_dir)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_root_key_of_the_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    data_dir = tmp_path / "kms"
    start_kms(data_dir).close()
    (data_dir / "root.key").write_bytes(b"r" * size)
    with pytest.raises(crypto.RootKeyError):
        start_kms(data_dir)


def test_health_reports_serving_without_credentials(kms: RunningKms) -> None:
    with grpc.insecure_channel(kms.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kms.v1.KeyManagementService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_kms_service_without_credentials(kms: RunningKms) -> None:
    with grpc.insecure_channel(kms.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "kms.v1.KeyManagementService" in services
    assert "grpc.health.v1.Health" in services
