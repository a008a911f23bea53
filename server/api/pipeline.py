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

Bytes that do not parse as the request never reach a servicer: they are
INVALID_ARGUMENT / MALFORMED_REQUEST, logged and counted like any call, and
nothing the protobuf runtime says about them reaches the caller.

Limits, each answered RESOURCE_EXHAUSTED at once: kms.v1 calls in progress
(--max-concurrent-rpcs), and apart from them the public calls and streams, in
all and per connection, so no unauthenticated client can starve the others.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc

from server.api.auth import Authenticator
from server.api.errors import CallAborted, aborted
from server.api.methods import ACTION_BY_METHOD, PUBLIC_SERVICES
from server.api.observability import Behaviour, CallObserver
from server.domain.errors import InvalidArgument, PermissionDenied, ResourceExhausted

log = logging.getLogger(__name__)

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only to type checkers
AioContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Metadata: TypeAlias = Sequence[tuple[str, str | bytes]]


@dataclass(frozen=True)
class Limits:
    """Calls in progress at once: kms.v1 ones, and public (health, reflection) ones apart."""

    max_calls: int = 256
    max_public_calls: int = 64
    max_public_calls_per_connection: int = 4


class Pipeline:
    def __init__(
        self,
        observer: CallObserver,
        authenticator: Authenticator,
        limits: Limits | None = None,
    ) -> None:
        self._observer = observer
        self._authenticator = authenticator
        self._limits = limits or Limits()
        self._public = PublicCalls(self._limits)
        # Only touched on the event loop: a plain count is enough.
        self._calls_in_progress = 0

    @property
    def public_calls(self) -> PublicCalls:
        return self._public

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler that serves `method` (a full name, /package.Service/Method) in its place."""
        unary = handler.unary_unary
        request_type = _request_type(handler)
        if method.startswith(PUBLIC_SERVICES):
            if unary is None:
                return self._public.wrap_stream(handler, request_type)
            limited = self._public.wrap_unary(_on_loop(unary))
            return _unary(handler, self._observer.wrap(method, _parsed(request_type, limited)))
        action = ACTION_BY_METHOD.get(method)
        if action is None or unary is None:
            return _deny_all(self._observer, method, handler)
        authenticated = self._authenticator.wrap(action, _on_loop(unary))
        admitted = self._admitted(request_type, authenticated)
        return _unary(handler, self._observer.wrap(method, admitted))

    def _admitted(self, request_type: str, behaviour: Behaviour) -> Behaviour:
        """`behaviour`, or at once INVALID_ARGUMENT for bytes that did not parse, or
        RESOURCE_EXHAUSTED beyond the calls in progress allowed (one layer: it is on every
        call's path)."""
        limit = self._limits.max_calls
        busy = ResourceExhausted(
            "TOO_MANY_CALLS",
            f"the server is answering its limit of {limit} calls at once; retry shortly",
        )
        malformed = _malformed(request_type)

        async def admitted(request: Any, context: AioContext) -> Any:
            if request is MALFORMED:
                raise aborted(malformed)
            if self._calls_in_progress >= limit:
                raise aborted(busy)
            self._calls_in_progress += 1
            try:
                return await behaviour(request, context)
            finally:
                self._calls_in_progress -= 1

        return admitted


class _Malformed:
    """What bytes that do not parse as the request become: refused before any servicer."""

    def __repr__(self) -> str:
        return "<malformed request>"


MALFORMED = _Malformed()


def _request_type(handler: Handler) -> str:
    """The request message's full name (kms.v1.GetActiveKeyRequest), for refusals."""
    owner = getattr(handler.request_deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "") or "request")


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The deserializer, answering MALFORMED where it would raise (grpc would send UNKNOWN
    with the runtime's exception text, and log a traceback)."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            return MALFORMED

    return parse


def _malformed(request_type: str) -> InvalidArgument:
    return InvalidArgument(
        "MALFORMED_REQUEST", f"the request does not parse as a {request_type} message"
    )


def _parsed(request_type: str, behaviour: Behaviour) -> Behaviour:
    refusal = _malformed(request_type)

    async def parsed(request: Any, context: AioContext) -> Any:
        if request is MALFORMED:
            raise aborted(refusal)
        return await behaviour(request, context)

    return parsed


class PublicCalls:
    """The health and reflection calls and streams in progress: capped in all and per
    connection, and ended when the server stops (a Watch stream never ends by itself)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._total = 0
        self._by_connection: dict[str, int] = {}
        self._stopping: asyncio.Event | None = None

    @property
    def in_progress(self) -> int:
        return self._total

    def stop_streams(self) -> None:
        """Ends every open stream (call on the event loop, at shutdown)."""
        self._stopping_event().set()

    def _stopping_event(self) -> asyncio.Event:
        if self._stopping is None:
            self._stopping = asyncio.Event()
        return self._stopping

    def _admit(self, connection: str) -> ResourceExhausted | None:
        limits = self._limits
        mine = self._by_connection.get(connection, 0)
        if self._total >= limits.max_public_calls:
            return _busy(f"{limits.max_public_calls} health and reflection calls are in progress")
        if mine >= limits.max_public_calls_per_connection:
            return _busy(
                f"{limits.max_public_calls_per_connection} health and reflection calls are in "
                "progress on this connection"
            )
        self._total += 1
        self._by_connection[connection] = mine + 1
        return None

    def _release(self, connection: str) -> None:
        self._total -= 1
        left = self._by_connection[connection] - 1
        if left:
            self._by_connection[connection] = left
        else:
            del self._by_connection[connection]

    def wrap_unary(self, behaviour: Behaviour) -> Behaviour:
        async def limited(request: Any, context: AioContext) -> Any:
            connection = context.peer()
            refusal = self._admit(connection)
            if refusal is not None:
                raise aborted(refusal)
            try:
                return await behaviour(request, context)
            finally:
                self._release(connection)

        return limited

    def wrap_stream(self, handler: Handler, request_type: str) -> Handler:
        """A streaming public method (health Watch, reflection), limited and stoppable."""
        inner: Callable[[Any, AioContext], Any]
        if handler.unary_stream is not None:
            inner = cast(Callable[[Any, AioContext], Any], handler.unary_stream)
            make = grpc.unary_stream_rpc_method_handler
        elif handler.stream_stream is not None:
            inner = cast(Callable[[Any, AioContext], Any], handler.stream_stream)
            make = grpc.stream_stream_rpc_method_handler
        else:
            return handler
        streaming_requests = handler.stream_stream is not None

        async def admit(request: Any, context: AioContext) -> tuple[str, Any]:
            connection = context.peer()
            refusal = self._admit(connection)
            if refusal is not None:
                await _abort(context, refusal)
            if streaming_requests:
                return connection, _checked_requests(request, request_type, context)
            if request is MALFORMED:
                self._release(connection)
                await _abort(context, _malformed(request_type))
            return connection, request

        async def yielding(request: Any, context: AioContext) -> AsyncIterator[Any]:
            connection, request = await admit(request, context)
            responses = inner(request, context)
            try:
                while True:
                    step = asyncio.ensure_future(responses.__anext__())
                    if not await self._before_stop(step):
                        return
                    try:
                        yield step.result()
                    except StopAsyncIteration:
                        return
            finally:
                self._release(connection)
                await responses.aclose()

        async def writing(request: Any, context: AioContext) -> None:
            # grpc.aio's health Watch: a coroutine that writes with context.write.
            connection, request = await admit(request, context)
            try:
                await self._before_stop(asyncio.ensure_future(inner(request, context)))
            finally:
                self._release(connection)

        return make(
            yielding if inspect.isasyncgenfunction(inner) else writing,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    async def _before_stop(self, work: asyncio.Future[Any]) -> bool:
        """Waits for `work`; True once it is done, False (cancelled) if the server stops first.

        Cancelled too when the call is (the client went away): nothing is left running.
        """
        stopping = asyncio.ensure_future(self._stopping_event().wait())
        try:
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
            return work.done()
        finally:
            stopping.cancel()
            if not work.done():
                work.cancel()


async def _abort(context: AioContext, error: InvalidArgument | ResourceExhausted) -> None:
    refusal = aborted(error)
    await context.abort(refusal.code, refusal.details, refusal.trailing_metadata)


def _busy(what: str) -> ResourceExhausted:
    return ResourceExhausted("PUBLIC_CALLS_LIMITED", f"{what}, the most allowed; retry later")


async def _checked_requests(
    requests: AsyncIterator[Any], request_type: str, context: AioContext
) -> AsyncIterator[Any]:
    async for request in requests:
        if request is MALFORMED:
            await _abort(context, _malformed(request_type))
        yield request


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
        request_deserializer=_tolerant(handler.request_deserializer),
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
