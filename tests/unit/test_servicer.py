"""The servicer on its own, without a socket (grpc_testing; the coroutine methods on an event
loop of their own): deny by default.

Authentication is the pipeline's job (server/api/pipeline.py); if the servicer is ever mounted
without it, every RPC must be refused rather than run for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc_testing
import pytest
from google.protobuf import message

from kms.v1 import kms_pb2
from server.api.errors import CallAborted
from server.api.servicer import KeyManagementServicer
from server.db.engine import make_engine, sqlite_url
from server.db.migrate import upgrade
from server.keystore.crypto import RootKey, new_key_material
from server.service import KeyManagementService

SERVICE = kms_pb2.DESCRIPTOR.services_by_name["KeyManagementService"]


@pytest.fixture
def servicer_server(tmp_path: Path) -> Iterator[grpc_testing.Server]:
    engine = make_engine(sqlite_url(str(tmp_path / "kms.sqlite3")))
    upgrade(engine)
    service = KeyManagementService(engine, RootKey(new_key_material()))
    try:
        yield grpc_testing.server_from_dictionary(
            {SERVICE: KeyManagementServicer(service)}, grpc_testing.strict_real_time()
        )
    finally:
        service.close()
        engine.dispose()


def _empty_request(method: str) -> message.Message:
    request_class: type[message.Message] = getattr(
        kms_pb2, SERVICE.methods_by_name[method].input_type.name
    )
    return request_class()


# Coroutines (they await group commit): grpc_testing cannot run them.
ON_THE_LOOP = {"GetActiveKey", "ResolveKeyForBackup"}


@pytest.mark.parametrize("method", sorted(set(SERVICE.methods_by_name) - ON_THE_LOOP))
def test_every_rpc_is_refused_without_an_authenticated_caller(
    servicer_server: grpc_testing.Server, method: str
) -> None:
    rpc = servicer_server.invoke_unary_unary(
        SERVICE.methods_by_name[method],
        (("authorization", "Bearer anything"),),
        _empty_request(method),
        5,
    )
    _, _, code, details = rpc.termination()
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert details == "this call is not authenticated"


@pytest.mark.parametrize("method", sorted(ON_THE_LOOP))
def test_every_coroutine_rpc_is_refused_without_an_authenticated_caller(
    tmp_path: Path, method: str
) -> None:
    engine = make_engine(sqlite_url(str(tmp_path / "kms.sqlite3")))
    upgrade(engine)
    service = KeyManagementService(engine, RootKey(new_key_material()))
    try:
        servicer = KeyManagementServicer(service)
        with pytest.raises(CallAborted) as refused:
            asyncio.run(getattr(servicer, method)(_empty_request(method), None))
    finally:
        service.close()
        engine.dispose()
    assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.details == "this call is not authenticated"
