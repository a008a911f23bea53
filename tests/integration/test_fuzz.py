"""Hostile and malformed input: hypothesis drives every RPC of the real server.

Every answer is OK or a defined status (never UNKNOWN, INTERNAL or an
outage), a refused call changes nothing in the database, and the server
keeps serving afterwards. One server per backend for the whole module.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.v1 import kms_pb2, kms_pb2_grpc
from tests.conftest import RunningKms, fresh_postgres_database, start_kms
from tests.integration.hardening_support import snapshot
from tests.integration.kms_helpers import issue, register

KEY = "fuzz-key"
BACKUP = "fuzz-backup"

DEFINED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def fuzz_kms(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningKms]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "kms"
    databases: Iterator[str] = (
        iter([""]) if request.param == "sqlite" else fresh_postgres_database()
    )
    url = next(databases)
    kms = start_kms(data_dir, url)
    try:
        admin = kms.stub("admin")
        register(admin, KEY, activate=True)
        register(admin, KEY)
        issue(kms.stub("backup"), BACKUP, KEY)
        yield kms
    finally:
        kms.close()
        for _ in databases:  # drops the PostgreSQL database
            pass


# Strings: empty, valid-looking, known, unknown, too long, control and non-ASCII characters,
# lone surrogates excluded (protobuf strings are UTF-8, so a client cannot even send them).
_TEXT_CHARS = st.characters(exclude_categories=["Cs"])
_NAME_CHARS = string.ascii_letters + string.digits + "._:-"
names = st.one_of(
    st.just(""),
    st.sampled_from([KEY, BACKUP, "unknown-key", "k" * 128, "k" * 129, "a/b", "-x", "\x00", "é"]),
    st.text(alphabet=_NAME_CHARS, min_size=1, max_size=140),
    st.text(alphabet=_TEXT_CHARS, max_size=40),
    st.sampled_from(["\udcff".encode("utf-8", "surrogatepass").decode("latin-1"), "\ufffd" * 50]),
)
long_text = st.one_of(
    st.text(alphabet=_TEXT_CHARS, max_size=60),
    st.sampled_from(["r" * 1024, "r" * 1025, "line\nbreak", "nul\x00", "x" * 70_000]),
)
u32 = st.one_of(
    st.sampled_from([0, 1, 2, 3, 2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)
)
blobs = st.one_of(st.binary(max_size=80), st.just(b"\x00" * 32), st.just(b"\xff" * 70_000))
page_tokens = st.one_of(
    st.just(""),
    st.sampled_from(["1", "0", "-1", "99999999999999999999", "9" * 21, "zz", "ff" * 200]),
    st.text(alphabet="0123456789abcdef", max_size=30),
    st.text(max_size=20),
)


def _request(method: str) -> st.SearchStrategy[Any]:
    m = kms_pb2
    return {
        "RegisterKeyVersion": st.builds(
            m.RegisterKeyVersionRequest,
            key_name=names,
            imported_material=st.one_of(blobs, st.binary(min_size=32, max_size=32)),
            activate_first_version=st.booleans(),
        ),
        "RotateActive": st.builds(
            lambda key, to, expected, reason: m.RotateActiveRequest(
                key_name=key,
                to_version=to,
                reason=reason,
                **({} if expected is None else {"expected_active_version": expected}),
            ),
            names,
            u32,
            st.none() | u32,
            long_text,
        ),
        "GetActiveKey": st.builds(m.GetActiveKeyRequest, key_name=names, backup_id=names),
        "ResolveKeyForBackup": st.builds(
            m.ResolveKeyForBackupRequest,
            backup_id=names,
            recovery=st.none()
            | st.builds(m.BackupKeyReference, key_name=names, version=u32, wrapped_data_key=blobs),
        ),
        "GetKeyVersion": st.builds(m.GetKeyVersionRequest, key_name=names, version=u32),
        "ListKeyVersions": st.builds(m.ListKeyVersionsRequest, key_name=names),
        "ListKeys": st.builds(m.ListKeysRequest, page_size=u32, page_token=page_tokens),
        "DisableKeyVersion": st.builds(
            m.DisableKeyVersionRequest, key_name=names, version=u32, reason=long_text
        ),
        "EnableKeyVersion": st.builds(
            m.EnableKeyVersionRequest, key_name=names, version=u32, reason=long_text
        ),
        "DestroyKeyVersion": st.builds(
            m.DestroyKeyVersionRequest,
            key_name=names,
            version=u32,
            reason=long_text,
            validate_only=st.booleans(),
        ),
        "CancelKeyVersionDestruction": st.builds(
            m.CancelKeyVersionDestructionRequest, key_name=names, version=u32, reason=long_text
        ),
        "ApproveKeyVersionDestruction": st.builds(
            m.ApproveKeyVersionDestructionRequest, key_name=names, version=u32, reason=long_text
        ),
        "ListBackups": st.builds(
            m.ListBackupsRequest,
            key_name=names,
            version=u32,
            page_size=u32,
            page_token=page_tokens,
        ),
        "RewrapBackups": st.builds(
            m.RewrapBackupsRequest, key_name=names, from_version=u32, batch_size=u32
        ),
        "UpdateKey": st.builds(
            m.UpdateKeyRequest,
            key_name=names,
            # No period short enough for the scheduler to rotate between a call and its check.
            rotation_period_seconds=st.one_of(
                st.sampled_from([0, 3600, 2**63, 2**64 - 1]), st.integers(3600, 2**64 - 1)
            ),
        ),
        "ListAuditEvents": st.builds(
            m.ListAuditEventsRequest, page_size=u32, page_token=page_tokens, key_name=names
        ),
        "VerifyAuditLog": st.just(m.VerifyAuditLogRequest()),
        "GetAuditCheckpoint": st.builds(
            m.GetAuditCheckpointRequest,
            sequence=st.one_of(st.sampled_from([0, 1, 2, 2**63 - 1, 2**63, 2**64 - 1]), u32),
        ),
        "GetAuditPublicKey": st.just(m.GetAuditPublicKeyRequest()),
    }[method]


METHODS = [
    method.name for method in kms_pb2.DESCRIPTOR.services_by_name["KeyManagementService"].methods
]
CREDENTIALS = ["admin", "backup", "restore", "auditor", "none", "bad-token", "malformed", "two"]
calls = st.sampled_from(METHODS).flatmap(
    lambda method: st.tuples(st.just(method), _request(method), st.sampled_from(CREDENTIALS))
)


def _metadata(kms: RunningKms, credentials: str) -> tuple[tuple[str, str], ...]:
    if credentials in kms.tokens:
        return (("authorization", f"Bearer {kms.tokens[credentials]}"),)
    return {
        "none": (),
        "bad-token": (("authorization", "Bearer not-a-token"),),
        "malformed": (("authorization", "Basic YWRtaW46YWRtaW4="),),
        "two": (
            ("authorization", f"Bearer {kms.tokens['admin']}"),
            ("authorization", f"Bearer {kms.tokens['admin']}"),
        ),
    }[credentials]


def test_every_rpc_answers_hostile_input_with_a_defined_status(fuzz_kms: RunningKms) -> None:
    kms = fuzz_kms
    channel = grpc.insecure_channel(kms.address)
    stub = kms_pb2_grpc.KeyManagementServiceStub(channel)

    @settings(
        max_examples=250,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(call=calls)
    def one_call(call: tuple[str, Any, str]) -> None:
        method, request, credentials = call
        before = snapshot(kms)
        try:
            getattr(stub, method)(request, metadata=_metadata(kms, credentials), timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            details = error.details()
            assert code in DEFINED, f"{method} as {credentials}: {code.name} {details!r}"
        if code != grpc.StatusCode.OK:
            assert snapshot(kms) == before, f"refused {method} ({code.name}) changed the database"
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            assert credentials not in ("admin",) or method in (
                "ListAuditEvents",
                "VerifyAuditLog",
                "GetAuditCheckpoint",
                "GetAuditPublicKey",
                "GetActiveKey",
                "ResolveKeyForBackup",
                "ApproveKeyVersionDestruction",  # SELF_APPROVAL: the requester is this admin
            )

    try:
        one_call()
        # Still serving: health, a good call, and an intact audit chain.
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        good = kms.stub("admin").RegisterKeyVersion(
            kms_pb2.RegisterKeyVersionRequest(key_name="after-fuzz", activate_first_version=True)
        )
        assert good.key_version.active
        verified = kms.stub("auditor").VerifyAuditLog(kms_pb2.VerifyAuditLogRequest())
        assert verified.intact, verified.problem
    finally:
        channel.close()
