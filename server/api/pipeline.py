"""What every call goes through, wrapped around each method handler once, when it is registered.

`PipelineServer` stands in for the `grpc.Server` while services are added to it,
and replaces each method handler it is given by one whose behaviour runs, in the
worker thread serving the call:

    observability (request id, metrics, one log line)    server.api.observability
      authentication (credentials -> CURRENT_PRINCIPAL)   server.api.auth
        the servicer method

Server interceptors did the same, but grpc runs them on its poller thread for every
call, building closures and a new handler each time; here nothing is built per call.

Deny by default: a method of a public service (health, reflection) is served
without credentials; every other method must be a unary kms.v1 method listed in
ACTION_BY_METHOD, or it is refused with PERMISSION_DENIED / METHOD_NOT_ALLOWED.
A method that no handler knows gets UNIMPLEMENTED from grpc itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, TypeAlias

import grpc

from server.api.auth import Authenticator
from server.api.errors import abort
from server.api.methods import ACTION_BY_METHOD, PUBLIC_SERVICES
from server.api.observability import Behaviour, CallObserver
from server.domain.errors import PermissionDenied

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only to type checkers


class Pipeline:
    def __init__(self, observer: CallObserver, authenticator: Authenticator) -> None:
        self._observer = observer
        self._authenticator = authenticator

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler that serves `method` (a full name, /package.Service/Method) in its place."""
        unary = handler.unary_unary
        if method.startswith(PUBLIC_SERVICES):
            if unary is None:
                return handler  # streaming (reflection, health Watch): as it is
            return _unary(handler, self._observer.wrap(method, unary))
        action = ACTION_BY_METHOD.get(method)
        if action is None or unary is None:
            return _deny_all(self._observer, method, handler)
        return _unary(handler, self._observer.wrap(method, self._authenticator.wrap(action, unary)))


class PipelineServer(grpc.Server):
    """A grpc.Server whose services, however they are added, all go through the pipeline."""

    def __init__(self, server: grpc.Server, pipeline: Pipeline) -> None:
        self._server = server
        self._pipeline = pipeline

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, Handler]
    ) -> None:
        """What generated `add_*Servicer_to_server` functions register: each handler, wrapped."""
        wrap = self._pipeline.wrap
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service_name,
            {
                name: wrap(f"/{service_name}/{name}", handler)
                for name, handler in method_handlers.items()
            },
        )

    def add_generic_rpc_handlers(
        self,
        generic_rpc_handlers: Iterable[grpc.GenericRpcHandler],  # type: ignore[type-arg]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            [_WrappedGenericHandler(handler, self._pipeline) for handler in generic_rpc_handlers]
        )

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None = None) -> threading.Event:
        return self._server.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


class _WrappedGenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler's answers, wrapped at each look-up.

    grpc asks generic handlers only about methods that were not registered by name
    (`add_registered_method_handlers`, which generated code uses for every method), so
    for the services of this server this runs only for unknown methods, answered None.
    """

    def __init__(self, handler: grpc.GenericRpcHandler, pipeline: Pipeline) -> None:  # type: ignore[type-arg]
        self._handler = handler
        self._pipeline = pipeline

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._handler.service(handler_call_details)
        if handler is None:
            return None
        return self._pipeline.wrap(handler_call_details.method, handler)


def _unary(handler: Handler, behaviour: Behaviour) -> Handler:
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _deny_all(observer: CallObserver, method: str, handler: Handler) -> Handler:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        abort(context, PermissionDenied("METHOD_NOT_ALLOWED", "this method is not allowed"))

    if handler.unary_unary is not None:
        return _unary(handler, observer.wrap(method, deny))
    return grpc.stream_stream_rpc_method_handler(
        lambda requests, context: deny(None, context),
        handler.request_deserializer,
        handler.response_serializer,
    )
