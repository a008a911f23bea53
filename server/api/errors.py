"""The one place where domain errors become gRPC statuses (AIP-193 ErrorInfo included)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.domain.errors import KmsError

ERROR_DOMAIN = "kms.v1"


def to_status(error: KmsError) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
    code = getattr(code_pb2, error.status_name)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code, message=error.message, details=[info])
    )
    return status


def abort(context: grpc.ServicerContext, error: KmsError) -> None:
    """Ends the call with the error's status; raises, like context.abort.

    What `abort_with_status` does, spelled out: the rich status travels in the
    trailing metadata (which grpc_testing's context also supports).
    """
    status = to_status(error)
    context.set_trailing_metadata(status.trailing_metadata)
    context.abort(status.code, status.details)


class CallAborted(Exception):
    """Ends a call on grpc.aio with this status.

    Raised, not sent: the pipeline's outermost layer logs the call, then sends it
    (`server.api.observability`), where grpc.aio's own `context.abort` would answer the
    client at once, before the call is counted and logged.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details
        self.trailing_metadata = tuple(trailing_metadata)


def aborted(error: KmsError) -> CallAborted:
    """The error's status (AIP-193 ErrorInfo included), to raise on grpc.aio."""
    status = to_status(error)
    return CallAborted(status.code, status.details, status.trailing_metadata)
