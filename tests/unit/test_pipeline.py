"""The call pipeline on a bare grpc.aio server (no database): deny by default, public services,
authentication with its audited refusals, the request id and one log line per call; blocking
and coroutine methods alike."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from server.api.auth import CURRENT_PRINCIPAL, Authenticator, PolicyHolder
from server.api.errors import abort
from server.api.observability import CallInfo, CallObserver
from server.api.pipeline import Pipeline, PipelineServer
from server.domain.errors import KmsError, NotFound, Unavailable
from server.domain.model import Action
from server.event_loop import EventLoopThread
from server.policy import Policy, hash_token

TOKEN = "pipeline-test-token-0123456789"
KMS = "/kms.v1.KeyManagementService"
CALL_FIELDS = {"method", "actor", "status", "reason", "duration_ms", "request_id", "peer"}


@dataclass
class Served:
    channel: grpc.Channel
    denials: list[tuple[str, Action, str]] = field(default_factory=list)
    audit_fails: bool = False

    def call(self, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.Call:
        _, call = self.channel.unary_unary(method, None, None).with_call(
            b"", metadata=metadata, timeout=10
        )
        return call

    def refused(self, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.Call:
        with pytest.raises(grpc.RpcError) as caught:
            self.call(method, metadata)
        return cast(grpc.Call, caught.value)


def _caller_name(request: bytes, context: grpc.ServicerContext) -> bytes:
    return CURRENT_PRINCIPAL.get().name.encode()  # on a worker thread


async def _caller_name_on_loop(request: bytes, context: object) -> bytes:
    return CURRENT_PRINCIPAL.get().name.encode()


def _refuse_blocking(request: bytes, context: grpc.ServicerContext) -> bytes:
    abort(context, NotFound("KEY_NOT_FOUND", "no such key"))
    raise AssertionError("abort returned")


async def _new_server() -> grpc.aio.Server:
    return grpc.aio.server(migration_thread_pool=futures.ThreadPoolExecutor(max_workers=2))


@pytest.fixture
def served() -> Iterator[Served]:
    policy = Policy.parse(
        {
            "principals": {
                "agent": {
                    "auth": ["token"],
                    "token_sha256": [hash_token(TOKEN)],
                    "grants": [{"roles": ["backup"], "keys": ["*"]}],
                }
            }
        }
    )
    loop = EventLoopThread(blocking_workers=4)
    grpc_server = loop.run(_new_server())
    channel: grpc.Channel | None = None
    served: Served | None = None

    def record_denial(actor: str, action: Action, error: KmsError) -> None:
        assert served is not None
        if served.audit_fails:
            raise Unavailable("AUDIT_UNAVAILABLE", "the audit log cannot be written")
        served.denials.append((actor, action, error.reason))

    server = PipelineServer(
        grpc_server,
        Pipeline(CallObserver(None), Authenticator(PolicyHolder(policy), record_denial)),
    )
    unary = grpc.unary_unary_rpc_method_handler(_caller_name)
    server.add_registered_method_handlers(
        "kms.v1.KeyManagementService",
        {
            "GetActiveKey": unary,  # listed and unary: served
            "ResolveKeyForBackup": grpc.unary_unary_rpc_method_handler(_caller_name_on_loop),
            "GetKeyVersion": grpc.unary_unary_rpc_method_handler(_refuse_blocking),
            "ListKeys": grpc.unary_stream_rpc_method_handler(lambda r, c: iter([b""])),
            "Unlisted": unary,  # one of ours but not in ACTION_BY_METHOD
        },
    )
    server.add_registered_method_handlers("test.Other", {"Call": unary})
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Generic", {"Call": unary})]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    served = Served(channel)
    try:
        yield served
    finally:
        channel.close()
        loop.run(server.stop(None))
        loop.stop()


def _reason(call: grpc.Call) -> str:
    status = rpc_status.from_call(call)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason)


def _call_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.call for r in caplog.records if r.name == "kms.call"]  # type: ignore[attr-defined]


def test_a_listed_unary_method_runs_as_the_authenticated_principal(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kms.call"):
        response, call = served.channel.unary_unary(f"{KMS}/GetActiveKey", None, None).with_call(
            b"", metadata=(("authorization", f"Bearer {TOKEN}"), ("x-request-id", "req-7"))
        )
    assert response == b"agent"
    assert ("x-request-id", "req-7") in call.trailing_metadata()
    [line] = _call_lines(caplog)
    assert set(line) == CALL_FIELDS
    assert (line["method"], line["actor"], line["status"], line["request_id"]) == (
        f"{KMS}/GetActiveKey",
        "agent",
        "OK",
        "req-7",
    )
    assert served.denials == []


def test_a_coroutine_method_runs_on_the_loop_as_the_authenticated_principal(
    served: Served,
) -> None:
    response, call = served.channel.unary_unary(f"{KMS}/ResolveKeyForBackup", None, None).with_call(
        b"", metadata=(("authorization", f"Bearer {TOKEN}"),)
    )
    assert response == b"agent"
    assert len(str(dict(call.trailing_metadata() or ())["x-request-id"])) == 32


def test_the_calls_metadata_kept_for_authentication_shows_in_no_repr() -> None:
    """The observer keeps the call's metadata for authentication to read; it holds the
    bearer token, which must not reach a log line through the call's repr."""
    metadata = (("authorization", f"Bearer {TOKEN}"), ("x-request-id", "req-1"))
    call = CallInfo(f"{KMS}/GetActiveKey", "req-1", metadata=metadata)
    assert TOKEN not in repr(call) and TOKEN not in str(call)


def test_a_blocking_method_that_aborts_keeps_its_status_details_and_the_request_id(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kms.call"):
        refused = served.refused(
            f"{KMS}/GetKeyVersion",
            (("authorization", f"Bearer {TOKEN}"), ("x-request-id", "req-9")),
        )
    assert (refused.code(), refused.details(), _reason(refused)) == (
        grpc.StatusCode.NOT_FOUND,
        "no such key",
        "KEY_NOT_FOUND",
    )
    assert ("x-request-id", "req-9") in (refused.trailing_metadata() or ())
    [line] = _call_lines(caplog)
    assert (line["status"], line["reason"], line["actor"]) == (
        "NOT_FOUND",
        "KEY_NOT_FOUND",
        "agent",
    )


@pytest.mark.parametrize(
    "method",
    [f"{KMS}/Unlisted", f"{KMS}/ListKeys", "/test.Other/Call", "/test.Generic/Call"],
    ids=["unlisted", "not-unary", "other-service", "generic-handler"],
)
def test_any_method_not_listed_or_not_unary_is_denied(served: Served, method: str) -> None:
    credentials = (("authorization", f"Bearer {TOKEN}"),)
    if method.endswith("ListKeys"):
        stream = served.channel.unary_stream(method, None, None)(
            b"", metadata=credentials, timeout=10
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
        refused = cast(grpc.Call, caught.value)
    else:
        refused = served.refused(method, credentials)
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _reason(refused) == "METHOD_NOT_ALLOWED"


@pytest.mark.parametrize("method", [f"{KMS}/NoSuchMethod", "/test.Other/Nope", "/no.Such/Call"])
def test_methods_nobody_serves_are_unimplemented(served: Served, method: str) -> None:
    assert served.refused(method).code() == grpc.StatusCode.UNIMPLEMENTED


def test_public_services_need_no_credentials_and_are_logged(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kms.call"):
        reply = health_pb2_grpc.HealthStub(served.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    [line] = _call_lines(caplog)
    assert (line["method"], line["actor"], line["status"]) == (
        "/grpc.health.v1.Health/Check",
        "anonymous",
        "OK",
    )


def test_an_unauthenticated_call_is_audited_logged_and_keeps_its_request_id(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kms.call"):
        refused = served.refused(f"{KMS}/GetActiveKey", (("x-request-id", "req-from-client"),))
        bad = served.refused(f"{KMS}/GetActiveKey", (("authorization", "Bearer wrong"),))
    assert (refused.code(), _reason(refused)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIALS_MISSING",
    )
    assert ("x-request-id", "req-from-client") in (refused.trailing_metadata() or ())
    assert _reason(bad) == "CREDENTIALS_INVALID"
    generated = dict(bad.trailing_metadata() or ())["x-request-id"]
    assert len(str(generated)) == 32
    assert served.denials == [
        ("anonymous", Action.ISSUE_DATA_KEY, "CREDENTIALS_MISSING"),
        ("anonymous", Action.ISSUE_DATA_KEY, "CREDENTIALS_INVALID"),
    ]
    lines = _call_lines(caplog)
    assert [(line["status"], line["reason"], line["request_id"]) for line in lines] == [
        ("UNAUTHENTICATED", "CREDENTIALS_MISSING", "req-from-client"),
        ("UNAUTHENTICATED", "CREDENTIALS_INVALID", generated),
    ]
    assert all(line["actor"] == "anonymous" for line in lines)
    assert "wrong" not in caplog.text


def test_a_refusal_that_cannot_be_audited_is_answered_audit_unavailable(served: Served) -> None:
    served.audit_fails = True
    refused = served.refused(f"{KMS}/GetActiveKey")
    assert (refused.code(), _reason(refused)) == (
        grpc.StatusCode.UNAVAILABLE,
        "AUDIT_UNAVAILABLE",
    )
