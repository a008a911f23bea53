"""Abuse that must not take the service down: floods of bad tokens, health streams that
never end, bytes that are not a request. No credentials are needed for any of them."""

from __future__ import annotations

import functools
import logging
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kms.v1 import kms_pb2
from server.api.methods import ACTION_BY_METHOD
from tests.conftest import RunningKms, start_kms
from tests.integration.cluster import Replica, Secrets
from tests.integration.hardening_support import audit_count, metric, scrape
from tests.integration.kms_helpers import (
    all_audit_events,
    code_of,
    expect_error,
    message_of,
    reason_of,
    register,
)

BAD_TOKEN = (("authorization", "Bearer not-a-token-of-this-server"),)


def test_ten_thousand_bad_token_calls_add_a_bounded_number_of_audit_rows(tmp_path: Path) -> None:
    kms = start_kms(tmp_path / "kms", auth_failure_summary_seconds="1")
    try:
        admin = kms.stub("admin")
        register(admin, activate=True)
        channel = grpc.insecure_channel(kms.address)
        flood = channel.unary_unary(
            "/kms.v1.KeyManagementService/GetActiveKey",
            request_serializer=kms_pb2.GetActiveKeyRequest.SerializeToString,
            response_deserializer=kms_pb2.GetActiveKeyResponse.FromString,
        )
        request = kms_pb2.GetActiveKeyRequest(key_name="tenant-a", backup_id="flood")
        rows_before = audit_count(kms)
        started = time.monotonic()
        codes: dict[grpc.StatusCode, int] = {}
        for batch in range(50):
            calls = [flood.future(request, metadata=BAD_TOKEN, timeout=30) for _ in range(200)]
            for call in calls:
                code = call.exception().code()  # type: ignore[union-attr]
                codes[code] = codes.get(code, 0) + 1
            # Authenticated calls are served throughout, from the same address.
            assert admin.ListKeys(kms_pb2.ListKeysRequest(), timeout=10).keys, batch
        elapsed = time.monotonic() - started
        time.sleep(1.5)  # the last summary is written after its interval
        kms.server.authenticator.flush()  # type: ignore[union-attr]
        added = audit_count(kms) - rows_before
        channel.close()
        assert sum(codes.values()) == 10_000
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        # The burst (10) and a refill of 1 per second, plus one summary per second and the
        # authenticated calls' own events (50 ListKeys and the registration).
        one_by_one = codes[grpc.StatusCode.UNAUTHENTICATED]
        assert one_by_one <= 10 + elapsed + 2
        assert added <= one_by_one + (elapsed + 3) + 51, (added, elapsed)
        summaries = [
            e
            for e in all_audit_events(kms.stub("auditor"))
            if e.action == "auth.unauthenticated_summary"
        ]
        assert summaries
        counted = 0
        for event in summaries:
            assert event.actor == "anonymous" and event.status_code == "RESOURCE_EXHAUSTED"
            count, rest = event.detail.split(" ", 1)
            assert rest.startswith("unauthenticated calls from ipv4:127.0.0.1 refused between ")
            counted += int(count)
        assert counted == codes[grpc.StatusCode.RESOURCE_EXHAUSTED], "every refusal is counted"
        assert "not-a-token" not in repr(summaries)
    finally:
        kms.close()


def test_a_peer_over_the_limit_is_refused_at_once_with_a_reason(tmp_path: Path) -> None:
    kms = start_kms(
        tmp_path / "kms",
        auth_failure_burst="2",
        auth_failures_per_minute="1",
        metrics_listen="127.0.0.1:0",
    )
    try:
        anonymous = kms.stub(None)
        for _ in range(2):
            expect_error(
                lambda: anonymous.ListKeys(kms_pb2.ListKeysRequest()),
                grpc.StatusCode.UNAUTHENTICATED,
                "CREDENTIALS_MISSING",
            )
        error = expect_error(
            lambda: anonymous.ListKeys(kms_pb2.ListKeysRequest()),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UNAUTHENTICATED_RATE_LIMITED",
        )
        assert "retry later" in message_of(error)
        samples = scrape(kms)
        assert (
            metric(
                samples,
                "kms_denials_total",
                code="RESOURCE_EXHAUSTED",
                reason="UNAUTHENTICATED_RATE_LIMITED",
            )
            == 1
        )
        assert (
            metric(
                samples, "kms_denials_total", code="UNAUTHENTICATED", reason="CREDENTIALS_MISSING"
            )
            == 2
        )
        kms.stub("admin").ListKeys(kms_pb2.ListKeysRequest())  # a valid token is never limited
    finally:
        kms.close()


# Malformed requests

# Field 1 (a string) of HealthCheckRequest holding bytes that are not UTF-8.
BAD_UTF8 = b"\x0a\x02\xff\xfe"
# A truncated varint tag: no message at all.
NOT_PROTOBUF = b"\xff\xff\xff\xff"


def _bad_utf8_for(method: str) -> bytes:
    """The request's first string field holding bytes that are not UTF-8 (else: not protobuf)."""
    name = method.rsplit("/", 1)[-1] + "Request"
    descriptor = kms_pb2.DESCRIPTOR.message_types_by_name[name]
    for field in descriptor.fields:
        if field.type == field.TYPE_STRING:
            return bytes([field.number << 3 | 2, 2]) + b"\xff\xfe"
    return NOT_PROTOBUF


@pytest.fixture(scope="module")
def metered_kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKms]:
    kms = start_kms(tmp_path_factory.mktemp("malformed") / "kms", metrics_listen="127.0.0.1:0")
    try:
        yield kms
    finally:
        kms.close()


def _raw(channel: grpc.Channel, method: str) -> Any:
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


@pytest.mark.parametrize("payload", ["bad-utf8", "not-protobuf"])
@pytest.mark.parametrize("method", sorted(ACTION_BY_METHOD))
def test_malformed_bytes_to_every_rpc_are_invalid_argument(
    metered_kms: RunningKms, method: str, payload: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = method.rsplit("/", 1)[-1]
    data = _bad_utf8_for(method) if payload == "bad-utf8" else NOT_PROTOBUF
    before = metric(scrape(metered_kms), "kms_calls_total", method=name, code="INVALID_ARGUMENT")
    with grpc.insecure_channel(metered_kms.address) as channel, caplog.at_level(logging.INFO):
        # With credentials and without: neither gets further than the parser.
        for metadata in ((("authorization", f"Bearer {metered_kms.tokens['admin']}"),), ()):
            error = expect_error(
                functools.partial(_raw(channel, method), data, metadata=metadata, timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT,
                "MALFORMED_REQUEST",
            )
            assert message_of(error) == (
                f"the request does not parse as a kms.v1.{name}Request message"
            )
    lines = [
        (r.getMessage().split()[1], getattr(r, "call", {}).get("reason"))
        for r in caplog.records
        if r.name == "kms.call" and r.getMessage().startswith(f"{method} ")
    ]
    assert lines == [("INVALID_ARGUMENT", "MALFORMED_REQUEST")] * 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no traceback"
    after = metric(scrape(metered_kms), "kms_calls_total", method=name, code="INVALID_ARGUMENT")
    assert after - before == 2
    # Still serving.
    metered_kms.stub("admin").ListKeys(kms_pb2.ListKeysRequest())


def test_malformed_bytes_to_health_and_reflection_are_invalid_argument(
    metered_kms: RunningKms,
) -> None:
    with grpc.insecure_channel(metered_kms.address) as channel:
        check = _raw(channel, "/grpc.health.v1.Health/Check")
        error = expect_error(
            lambda: check(BAD_UTF8, timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MALFORMED_REQUEST",
        )
        assert "grpc.health.v1.HealthCheckRequest" in message_of(error)
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(watch(BAD_UTF8, timeout=10))
        assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(caught.value) == "MALFORMED_REQUEST"
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(reflect(iter([b"\x3a\x02\xff\xfe"]), timeout=10))  # list_services, bad UTF-8
        assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# Health streams


def _connection(address: str) -> grpc.Channel:
    """A channel with a connection of its own (channels otherwise share one per address)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _open_watches(channels: list[grpc.Channel], per_channel: int) -> tuple[list[Any], list[Any]]:
    """Opens Watch streams; returns (open ones, refused errors)."""
    opened, refused = [], []
    for channel in channels:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(per_channel):
            stream = stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            try:
                first = next(stream)
            except grpc.RpcError as error:
                refused.append(error)
                continue
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            opened.append(stream)
    return opened, refused


def test_health_streams_have_caps_of_their_own(tmp_path: Path) -> None:
    kms = start_kms(
        tmp_path / "kms",
        max_concurrent_rpcs="4",
        public_max_concurrent_rpcs="6",
        public_max_rpcs_per_connection="2",
    )
    channels = [_connection(kms.address) for _ in range(4)]
    try:
        opened, refused = _open_watches(channels, 3)
        # Two per connection, six in all: the rest are refused at once, with a reason.
        assert len(opened) == 6 and len(refused) == 6
        assert {(code_of(e), reason_of(e)) for e in refused} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "PUBLIC_CALLS_LIMITED")
        }
        # kms.v1 calls, more than all public places, are not affected.
        admin = kms.stub("admin")
        for _ in range(5):
            admin.ListKeys(kms_pb2.ListKeysRequest(), timeout=5)
        for stream in opened[:3]:
            stream.cancel()
        # A cancelled stream gives its place back.
        fresh = _connection(kms.address)
        channels.append(fresh)
        deadline = time.monotonic() + 10
        while True:
            try:
                health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=5)
                break
            except grpc.RpcError as error:
                assert code_of(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "cancelled streams keep their places"
                time.sleep(0.05)
    finally:
        for channel in channels:
            channel.close()
        kms.close()


def test_300_watch_streams_do_not_delay_an_admin_call_and_sigterm_ends_within_grace(
    tmp_path: Path,
) -> None:
    secrets = Secrets.create(tmp_path / "secrets")
    grace = 3
    server = Replica(
        "watched",
        f"sqlite+pysqlite:///{tmp_path / 'kms.sqlite3'}",
        secrets,
        tmp_path / "server",
        extra_args=[
            "--public-max-concurrent-rpcs",
            "400",
            "--public-max-rpcs-per-connection",
            "50",
            "--shutdown-grace-seconds",
            str(grace),
        ],
    )
    server.start()
    channels = [_connection(server.address) for _ in range(10)]
    try:
        opened, refused = _open_watches(channels, 30)
        assert (len(opened), refused) == (300, [])
        # More open streams than --max-concurrent-rpcs (256), and an admin call is answered.
        admin = server.stub("admin")
        admin.RegisterKeyVersion(
            kms_pb2.RegisterKeyVersionRequest(key_name="k", activate_first_version=True), timeout=5
        )
        assert [k.name for k in admin.ListKeys(kms_pb2.ListKeysRequest(), timeout=5).keys] == ["k"]
        # A few cancelled, as clients that went away.
        for stream in opened[:20]:
            stream.cancel()
        assert server.process is not None
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=grace + 10)
        took = time.monotonic() - started
        assert server.process.returncode == 0, server.log()
        assert took < grace + 2, f"SIGTERM took {took:.1f} s with Watch streams open"
        # The open streams were told NOT_SERVING, then ended.
        statuses = []
        for stream in opened[20:30]:
            try:
                statuses += [reply.status for reply in stream]
            except grpc.RpcError as error:
                statuses.append(code_of(error))
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    finally:
        for channel in channels:
            channel.close()
        server.close_channels()
        server.kill()


def test_watch_streams_on_the_health_port_cannot_starve_its_probes(tmp_path: Path) -> None:
    """The loopback --health-listen port once had two threads: two Watch streams and no probe
    got an answer. Its streams now hold no thread and count towards the public caps."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health_address = f"127.0.0.1:{probe.getsockname()[1]}"
    kms = start_kms(tmp_path / "kms", health_listen=health_address)
    channels = [_connection(health_address) for _ in range(3)]
    try:
        opened, refused = _open_watches(channels[:2], 5)
        assert len(opened) == 8 and {reason_of(e) for e in refused} == {"PUBLIC_CALLS_LIMITED"}
        reply = health_pb2_grpc.HealthStub(channels[2]).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for channel in channels:
            channel.close()
        kms.close()
