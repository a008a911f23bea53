"""Secrets stay secret: after a full workflow with DEBUG logging, no secret appears anywhere.

Searched: every log record (as text and as JSON), every audit row (all columns)
and every error message. Secrets: the root key, each version's material
(unwrapped here from the key_versions rows with the root key), each data key
and each token, as raw bytes, escaped bytes, hex (lower and upper) and base64
(standard and URL-safe, with and without padding).
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from sqlalchemy import text

from kms.v1 import kms_pb2
from server.api.observability import JsonFormatter
from server.domain.model import DataKey
from server.keystore.crypto import RootKey
from tests.conftest import start_kms
from tests.integration.kms_helpers import KEY, database, issue, register, resolve, rotate

LOGGERS = ("", "sqlalchemy", "sqlalchemy.engine", "sqlalchemy.pool", "alembic", "grpc", "server")


def forms(secret: bytes) -> Iterator[bytes]:
    """The ways a secret could be written down."""
    yield secret
    yield repr(secret)[2:-1].encode()  # as Python prints bytes, e.g. in a SQL parameter log
    yield secret.hex().encode()
    yield secret.hex().upper().encode()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(secret)
        yield encoded
        yield encoded.rstrip(b"=")


@pytest.fixture
def debug_logging(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


def test_no_secret_reaches_logs_audit_rows_or_error_messages(
    tmp_path: Path, database_url: str, debug_logging: pytest.LogCaptureFixture
) -> None:
    # Started inside the test so that start-up (migrations, root key check) is logged at DEBUG.
    kms = start_kms(tmp_path / "kms", database_url)
    errors: list[str] = []
    data_keys: list[bytes] = []
    try:
        admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
        auditor = kms.stub("auditor")

        def refused(call: Callable[[], Any]) -> None:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            error = cast(grpc.Call, caught.value)
            errors.append(f"{error.code()} {error.details()} {error.trailing_metadata()!r}")
            errors.append(str(caught.value))

        imported = os.urandom(32)
        register(admin, material=imported, activate=True)
        first = issue(backup, "backup-1")
        register(admin)
        register(admin)
        rotate(admin, 2, reason="quarterly")
        second = issue(backup, "backup-2")
        data_keys += [first.data_key, second.data_key]
        data_keys.append(resolve(restore, "backup-1").data_key)
        # Versions' material, unwrapped here before any of it is destroyed.
        root_key_bytes = (kms.data_dir / "root.key").read_bytes()
        root_key = RootKey(root_key_bytes)
        with database(kms) as connection:
            rows = connection.execute(
                text("SELECT key_name, version, wrapped_material FROM key_versions")
            ).all()
        materials = [
            bytes(root_key.unwrap_version_material(name, version, bytes(blob)))
            for name, version, blob in rows
        ]
        # The server's own secrets, as the root key unwraps them from the database.
        with database(kms) as connection:
            meta: dict[str, bytes] = {
                name: bytes(value)
                for name, value in connection.execute(text("SELECT name, value FROM server_meta"))
            }
        keyed_from = meta["audit_keyed_from"].decode()
        server_secrets = {
            name: bytes(root_key.unwrap_server_secret(label, bytes(meta[name])))
            for name, label in (
                ("audit_mac_key", f"audit_mac_key@{keyed_from}"),
                ("state_mac_key", "state_mac_key"),
                ("audit_signing_key", "audit_signing_key"),
            )
        }
        assert imported in materials and len(materials) == 3
        admin.DisableKeyVersion(
            kms_pb2.DisableKeyVersionRequest(key_name=KEY, version=3, reason="hold")
        )
        admin.EnableKeyVersion(kms_pb2.EnableKeyVersionRequest(key_name=KEY, version=3))
        admin.DestroyKeyVersion(
            kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=1, reason="shred")
        )
        # Denials and failures of every kind, each with an error message.
        refused(lambda: resolve(restore, "backup-1"))  # its version was destroyed
        refused(lambda: rotate(backup, 3))
        refused(lambda: rotate(kms.stub(None), 3))
        refused(
            lambda: admin.ListKeys(
                kms_pb2.ListKeysRequest(),
                metadata=(("authorization", f"Bearer {kms.tokens['admin']}x"),),
            )
        )
        refused(lambda: issue(restore, "backup-9"))
        refused(lambda: resolve(restore, "no-such-backup"))
        refused(
            lambda: resolve(
                restore,
                "backup-4",
                kms_pb2.BackupKeyReference(
                    key_name=KEY, version=2, wrapped_data_key=second.wrapped_data_key
                ),
            )
        )
        refused(lambda: register(admin, "imported-wrong", material=imported[:31]))
        auditor.ListAuditEvents(kms_pb2.ListAuditEventsRequest())
        assert auditor.VerifyAuditLog(kms_pb2.VerifyAuditLogRequest()).intact
        with database(kms) as connection:
            audit_rows = connection.execute(text("SELECT * FROM audit_events")).all()
    finally:
        kms.close()

    secrets: dict[str, bytes] = {"root key": root_key_bytes}
    secrets.update({f"version material {i}": m for i, m in enumerate(materials)})
    secrets.update(server_secrets)
    secrets.update({f"data key {i}": k for i, k in enumerate(data_keys)})
    secrets.update({f"{role} token": t.encode() for role, t in kms.tokens.items()})

    formatter = JsonFormatter()
    haystacks: dict[str, bytes] = {
        "log text": debug_logging.text.encode("utf-8", "backslashreplace"),
        "log records": "\n".join(
            f"{r.getMessage()} {r.args!r} {formatter.format(r)}" for r in debug_logging.records
        ).encode("utf-8", "backslashreplace"),
        "audit rows": b"\n".join(
            b"|".join(value if isinstance(value, bytes) else str(value).encode() for value in row)
            for row in audit_rows
        ),
        "error messages": "\n".join(errors).encode("utf-8", "backslashreplace"),
    }
    assert len(debug_logging.records) > 50, "DEBUG logging was not captured"
    assert any(r.name.startswith("sqlalchemy") for r in debug_logging.records)
    # The search works: what is not secret does show up (SQL parameters, audit fields).
    assert b"backup-2" in haystacks["log records"] and b"quarterly" in haystacks["audit rows"]
    for secret_name, secret in secrets.items():
        for form in forms(secret):
            for where, haystack in haystacks.items():
                assert form not in haystack, f"the {secret_name} appears in the {where}"


def test_objects_holding_secrets_hide_them_in_repr() -> None:
    secret = os.urandom(32)
    data_key = DataKey("b", "k", 1, secret, b"wrapped")
    root_key = RootKey(secret)
    for shown in (repr(data_key), str(data_key), repr(root_key), str(root_key)):
        for form in forms(secret):
            assert form.decode("latin-1") not in shown
    assert "hidden" in repr(root_key)
