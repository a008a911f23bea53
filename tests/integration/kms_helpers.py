"""Helpers for the kms.v1 API tests: AIP-193 errors, audit reads and direct database access.

Direct database access simulates what an attacker or an operator with access
to the database (not to the root key) can do: edit rows, delete rows, restore
an older snapshot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import Connection, create_engine, text

from kms.v1 import kms_pb2
from tests.conftest import KmsStub, RunningKms

ERROR_DOMAIN = "kms.v1"
KEY = "tenant-a"


def reason_of(error: grpc.RpcError) -> str:
    """The AIP-193 ErrorInfo reason of a failed call (domain kms.v1)."""
    status = rpc_status.from_call(cast(grpc.Call, error))
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == ERROR_DOMAIN
            return str(info.reason)
    raise AssertionError("the error carries no ErrorInfo")


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    code: grpc.StatusCode = cast(grpc.Call, error).code()
    return code


def message_of(error: grpc.RpcError) -> str:
    return str(cast(grpc.Call, error).details() or "")


def expect_error(
    call: Callable[[], Any], code: grpc.StatusCode, reason: str | None = None
) -> grpc.RpcError:
    """Runs the call, which must fail with this code (and reason); returns the error."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    got = (code_of(error), reason_of(error))
    assert got == (code, reason or got[1]), message_of(error)
    assert message_of(error), "every error explains itself to people"
    return error


def register(
    admin: KmsStub, key: str = KEY, *, activate: bool = False, material: bytes = b""
) -> kms_pb2.KeyVersion:
    response = admin.RegisterKeyVersion(
        kms_pb2.RegisterKeyVersionRequest(
            key_name=key, imported_material=material, activate_first_version=activate
        )
    )
    version: kms_pb2.KeyVersion = response.key_version
    return version


def rotate(admin: KmsStub, to_version: int, key: str = KEY, reason: str = "") -> Any:
    return admin.RotateActive(
        kms_pb2.RotateActiveRequest(key_name=key, to_version=to_version, reason=reason)
    )


def issue(backup: KmsStub, backup_id: str, key: str = KEY) -> Any:
    return backup.GetActiveKey(kms_pb2.GetActiveKeyRequest(key_name=key, backup_id=backup_id))


def resolve(
    restore: KmsStub, backup_id: str, recovery: kms_pb2.BackupKeyReference | None = None
) -> Any:
    return restore.ResolveKeyForBackup(
        kms_pb2.ResolveKeyForBackupRequest(backup_id=backup_id, recovery=recovery)
    )


def versions(admin: KmsStub, key: str = KEY) -> list[kms_pb2.KeyVersion]:
    response = admin.ListKeyVersions(kms_pb2.ListKeyVersionsRequest(key_name=key))
    return list(response.key_versions)


def active_version(admin: KmsStub, key: str = KEY) -> int:
    return sum(v.version for v in versions(admin, key) if v.active)


def all_audit_events(auditor: KmsStub, key_name: str = "") -> list[kms_pb2.AuditEvent]:
    events: list[kms_pb2.AuditEvent] = []
    token = ""
    while True:
        page = auditor.ListAuditEvents(
            kms_pb2.ListAuditEventsRequest(page_size=1000, page_token=token, key_name=key_name)
        )
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


def last_event(kms: RunningKms, action: str) -> kms_pb2.AuditEvent:
    """The newest audit event of this action (read with the auditor's token)."""
    matching = [e for e in all_audit_events(kms.stub("auditor")) if e.action == action]
    assert matching, f"no {action} event in the audit log"
    return matching[-1]


def verify(kms: RunningKms) -> Any:
    return kms.stub("auditor").VerifyAuditLog(kms_pb2.VerifyAuditLogRequest())


@contextlib.contextmanager
def database(kms: RunningKms) -> Iterator[Connection]:
    """A connection to the server's own database, in one transaction committed at the end."""
    engine = create_engine(kms.database_url)
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()


def is_postgres(connection: Connection) -> bool:
    return connection.dialect.name == "postgresql"


def drop_append_only_triggers(connection: Connection) -> None:
    """What an attacker with database access does first."""
    if is_postgres(connection):
        connection.execute(text("DROP TRIGGER audit_events_append_only ON audit_events"))
    else:
        connection.execute(text("DROP TRIGGER audit_events_no_update"))
        connection.execute(text("DROP TRIGGER audit_events_no_delete"))


def audit_rows_text(kms: RunningKms) -> str:
    """Every audit row, every column, as one string to search for things that must not be there."""
    with database(kms) as connection:
        rows = connection.execute(text("SELECT * FROM audit_events")).all()
    return "\n".join(repr(tuple(row)) for row in rows)
