"""What every call goes through, wrapped around each method handler once, when it is registered.

The server is a grpc.aio server on one event-loop thread (server/app.py).
`PipelineServer` stands in for it while services are added, and replaces each
unary method handler it is given by a coroutine that runs, on the event loop:

    observability (request id, metrics, one log line)    server.api.observability
      authentication (credentials -> CURRENT_PRINCIPAL)   server.api.auth
        the servicer method

A servicer method that is a coroutine (GetActiveKey, ResolveKeyForBackup: they
wait on group commit) runs on the loop too. Every other method is plain blocking
code (its own database transaction): it runs on a worker thread of the loop's
default executor, seeing a `BlockingContext` whose status is passed on to the
call when it returns, so the loop never waits on a database.

Deny by default: a method of a public service (health, reflection) is served
without credentials; every other method must be a unary kms.v1 method listed in
ACTION_BY_METHOD, or it is refused with PERMISSION_DENIED / METHOD_NOT_ALLOWED.
A method that no handler knows gets UNIMPLEMENTED from grpc itself.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias, cast

import grpc

from server.api.auth import Authenticator
from server.api.errors import CallAborted, aborted
from server.api.methods import ACTION_BY_METHOD, PUBLIC_SERVICES
from server.api.observability import Behaviour, CallObserver
from server.domain.errors import PermissionDenied

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only to type checkers
AioContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Metadata: TypeAlias = Sequence[tuple[str, str | bytes]]


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
            return _unary(handler, self._observer.wrap(method, _on_loop(unary)))
        action = ACTION_BY_METHOD.get(method)
        if action is None or unary is None:
            return _deny_all(self._observer, method, handler)
        authenticated = self._authenticator.wrap(action, _on_loop(unary))
        return _unary(handler, self._observer.wrap(method, authenticated))


class BlockingContext:
    """The call as a blocking method sees it from a worker thread (see the module docstring).

    The methods servicers use: reads go to the call; the status a method sets (trailing
    metadata, code, details, or an abort) is kept here and applied on the event loop.
    """

    def __init__(self, context: AioContext) -> None:
        self._context = context
        self._metadata = context.invocation_metadata()
        self.trailing_metadata: Metadata = ()
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    def invocation_metadata(self) -> Any:
        return self._metadata

    def peer(self) -> str:
        return self._context.peer()

    def auth_context(self) -> Any:
        return self._context.auth_context()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self.trailing_metadata = tuple(trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise CallAborted(code, details, self.trailing_metadata)

    def pass_on(self, context: AioContext) -> None:
        """Gives the call the status the method set, on the event loop."""
        if self.trailing_metadata:
            kept = context.trailing_metadata() or ()
            context.set_trailing_metadata((*kept, *self.trailing_metadata))
        if self.code is not None:
            context.set_code(self.code)
        if self.details is not None:
            context.set_details(self.details)


def _on_loop(behaviour: Callable[..., Any]) -> Behaviour:
    """The method as a coroutine: itself if it is one, else run on a worker thread."""
    if inspect.iscoroutinefunction(behaviour):
        return cast(Behaviour, behaviour)

    async def blocking(request: Any, context: AioContext) -> Any:
        facade = BlockingContext(context)
        # to_thread runs it in this call's contextvars (caller, request id); an abort
        # comes back as CallAborted, for the observer to send.
        response = await asyncio.to_thread(behaviour, request, facade)
        facade.pass_on(context)
        return response

    return blocking


class PipelineServer(grpc.aio.Server):
    """A grpc.aio.Server whose services, however they are added, all go through the pipeline."""

    def __init__(self, server: grpc.aio.Server, pipeline: Pipeline) -> None:
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

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)


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


_NOT_ALLOWED = PermissionDenied("METHOD_NOT_ALLOWED", "this method is not allowed")


def _deny_all(observer: CallObserver, method: str, handler: Handler) -> Handler:
    async def deny(request: Any, context: AioContext) -> Any:
        raise aborted(_NOT_ALLOWED)

    async def deny_stream(requests: Any, context: AioContext) -> None:
        refusal = aborted(_NOT_ALLOWED)  # not observed: sent here
        await context.abort(refusal.code, refusal.details, refusal.trailing_metadata)

    if handler.unary_unary is not None:
        return _unary(handler, observer.wrap(method, deny))
    return grpc.stream_stream_rpc_method_handler(
        deny_stream, handler.request_deserializer, handler.response_serializer
    )
