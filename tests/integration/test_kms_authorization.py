"""Every RPC against every caller: the role it needs, other roles, no or bad credentials.

One server per backend serves the whole matrix; each case checks the answer
and the audit event the call left behind.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from kms.v1 import kms_pb2, kms_pb2_grpc
from tests.conftest import KmsStub, RunningKms, fresh_postgres_database, start_kms
from tests.integration.kms_helpers import (
    audit_rows_text,
    code_of,
    database,
    expect_error,
    message_of,
    reason_of,
)

KEY = "matrix"
BACKUP_ID = "matrix-backup"
INVALID_TOKEN = "not-a-token-" + secrets.token_urlsafe(24)

# RPC name -> (the role it needs, a well-formed request, the action it audits)
RPCS: dict[str, tuple[str, Callable[[], Any], str]] = {
    "RegisterKeyVersion": (
        "admin",
        lambda: kms_pb2.RegisterKeyVersionRequest(key_name="matrix-registered"),
        "key_version.register",
    ),
    "RotateActive": (
        "admin",
        lambda: kms_pb2.RotateActiveRequest(key_name=KEY, to_version=1),
        "key.rotate",
    ),
    "GetActiveKey": (
        "backup",
        lambda: kms_pb2.GetActiveKeyRequest(key_name=KEY, backup_id=BACKUP_ID),
        "data_key.issue",
    ),
    "ResolveKeyForBackup": (
        "restore",
        lambda: kms_pb2.ResolveKeyForBackupRequest(backup_id=BACKUP_ID),
        "data_key.resolve",
    ),
    "GetKeyVersion": (
        "admin",
        lambda: kms_pb2.GetKeyVersionRequest(key_name=KEY, version=1),
        "key_version.get",
    ),
    "ListKeyVersions": (
        "admin",
        lambda: kms_pb2.ListKeyVersionsRequest(key_name=KEY),
        "key_version.list",
    ),
    "ListKeys": ("admin", kms_pb2.ListKeysRequest, "key.list"),
    "DisableKeyVersion": (
        "admin",
        lambda: kms_pb2.DisableKeyVersionRequest(key_name=KEY, version=2),
        "key_version.disable",
    ),
    "EnableKeyVersion": (
        "admin",
        lambda: kms_pb2.EnableKeyVersionRequest(key_name=KEY, version=2),
        "key_version.enable",
    ),
    "DestroyKeyVersion": (
        "admin",
        # No such version: the allowed caller is refused for a reason other than auth.
        lambda: kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=99),
        "key_version.schedule_destroy",
    ),
    "ListAuditEvents": ("auditor", kms_pb2.ListAuditEventsRequest, "audit.list"),
    "VerifyAuditLog": ("auditor", kms_pb2.VerifyAuditLogRequest, "audit.verify"),
}
ROLES = ("admin", "backup", "restore", "auditor")
# caller -> the authorization metadata it sends (roles are filled in from the server's tokens)
ANONYMOUS_CALLERS: dict[str, tuple[tuple[str, str], ...]] = {
    "no-credentials": (),
    "invalid-token": (("authorization", f"Bearer {INVALID_TOKEN}"),),
    "basic-scheme": (("authorization", f"Basic {INVALID_TOKEN}"),),
    "bearer-without-space": (("authorization", f"Bearer{INVALID_TOKEN}"),),
    "empty-bearer": (("authorization", "Bearer "),),
}
UNAUTHENTICATED_REASONS = {
    "no-credentials": "CREDENTIALS_MISSING",
    "invalid-token": "CREDENTIALS_INVALID",
    "basic-scheme": "CREDENTIALS_MALFORMED",
    "bearer-without-space": "CREDENTIALS_MALFORMED",
    "empty-bearer": "CREDENTIALS_INVALID",
}


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def shared_kms(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningKms]:
    data_dir: Path = tmp_path_factory.mktemp("matrix") / "kms"
    databases = fresh_postgres_database() if request.param == "postgres" else iter([""])
    database_url = next(databases)
    # Every anonymous call here is audited on its own: more than one address's burst.
    running = start_kms(data_dir, database_url, auth_failure_burst="1000")
    try:
        admin = running.stub("admin")
        admin.RegisterKeyVersion(
            kms_pb2.RegisterKeyVersionRequest(key_name=KEY, activate_first_version=True)
        )
        admin.RegisterKeyVersion(kms_pb2.RegisterKeyVersionRequest(key_name=KEY))
        yield running
    finally:
        running.close()
        for _ in databases:  # drops the PostgreSQL database
            pass


def stub_with(kms: RunningKms, metadata: tuple[tuple[str, str], ...]) -> KmsStub:
    channel = grpc.insecure_channel(kms.address)
    kms._channels.append(channel)
    return KmsStub(kms_pb2_grpc.KeyManagementServiceStub(channel), metadata)


def newest_event(kms: RunningKms) -> dict[str, Any]:
    with database(kms) as connection:
        row = connection.execute(
            text("SELECT * FROM audit_events ORDER BY sequence DESC LIMIT 1")
        ).one()
    return dict(row._mapping)


@pytest.mark.parametrize("caller", ROLES)
@pytest.mark.parametrize("rpc", RPCS)
def test_each_rpc_serves_only_its_role(shared_kms: RunningKms, rpc: str, caller: str) -> None:
    role, make_request, action = RPCS[rpc]
    call = getattr(shared_kms.stub(caller), rpc)
    if caller == role:
        try:
            call(make_request())
        except grpc.RpcError as error:  # refused for a reason of its own, never for auth
            assert code_of(error) not in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            ), message_of(error)
            assert reason_of(error)
        event = newest_event(shared_kms)
        assert (event["action"], event["actor"]) == (action, f"dev-{caller}")
        return
    expect_error(
        lambda: call(make_request()), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"
    )
    event = newest_event(shared_kms)
    assert (event["action"], event["actor"]) == (action, f"dev-{caller}")
    assert (event["outcome"], event["status_code"]) == ("denied", "PERMISSION_DENIED")
    assert role in event["detail"]


@pytest.mark.parametrize("caller", ANONYMOUS_CALLERS)
@pytest.mark.parametrize("rpc", RPCS)
def test_each_rpc_refuses_missing_or_bad_credentials(
    shared_kms: RunningKms, rpc: str, caller: str
) -> None:
    _, make_request, action = RPCS[rpc]
    call = getattr(stub_with(shared_kms, ANONYMOUS_CALLERS[caller]), rpc)
    expect_error(
        lambda: call(make_request()),
        grpc.StatusCode.UNAUTHENTICATED,
        UNAUTHENTICATED_REASONS[caller],
    )
    event = newest_event(shared_kms)
    assert (event["action"], event["actor"]) == (action, "anonymous")
    assert (event["outcome"], event["status_code"]) == ("denied", "UNAUTHENTICATED")
    assert INVALID_TOKEN not in repr(event)


def test_two_authorization_headers_are_refused(shared_kms: RunningKms) -> None:
    tokens = shared_kms.tokens
    stub = stub_with(
        shared_kms,
        (
            ("authorization", f"Bearer {tokens['auditor']}"),
            ("authorization", f"Bearer {tokens['admin']}"),
        ),
    )
    expect_error(
        lambda: stub.ListKeys(kms_pb2.ListKeysRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIALS_AMBIGUOUS",
    )


def test_the_bearer_scheme_is_case_insensitive(shared_kms: RunningKms) -> None:
    stub = stub_with(shared_kms, (("authorization", f"bearer {shared_kms.tokens['admin']}"),))
    stub.ListKeys(kms_pb2.ListKeysRequest())


def test_no_token_ever_reaches_the_audit_log(shared_kms: RunningKms) -> None:
    rows = audit_rows_text(shared_kms)
    assert "anonymous" in rows and "dev-admin" in rows  # the matrix ran against this server
    for token in (INVALID_TOKEN, *shared_kms.tokens.values()):
        assert token not in rows
        assert token[:16] not in rows


def test_the_audit_log_of_the_matrix_is_intact(shared_kms: RunningKms) -> None:
    result = shared_kms.stub("auditor").VerifyAuditLog(kms_pb2.VerifyAuditLogRequest())
    assert result.intact, result.problem
    assert result.events_checked > 2
