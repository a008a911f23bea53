"""Authentication: a server interceptor that turns credentials into a Principal.

Deny by default: a method that is neither one of ours nor public is refused.
Roles are checked by the service layer, which audits every refusal.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

import grpc

from server.api.errors import abort
from server.api.methods import ACTION_BY_METHOD, PUBLIC_SERVICES
from server.api.observability import CURRENT_CALL
from server.domain.errors import KmsError, PermissionDenied, Unauthenticated
from server.domain.model import ANONYMOUS, Action, Principal
from server.policy import Policy

log = logging.getLogger(__name__)

CURRENT_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")
BEARER_PREFIX = "bearer "


class PolicyHolder:
    """The current policy; replaced whole on reload, so readers never see half a policy."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self,
        policy: PolicyHolder,
        record_denial: Callable[[str, Action, KmsError], None],
    ) -> None:
        self._policy = policy
        self._record_denial = record_denial

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(PUBLIC_SERVICES):
            return handler
        action = ACTION_BY_METHOD.get(method)
        if action is None or handler.unary_unary is None:
            return _deny_all(handler)
        metadata = handler_call_details.invocation_metadata or ()
        behaviour = handler.unary_unary

        def authenticated(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                principal = self._authenticate(metadata, context)
            except KmsError as error:
                try:
                    self._record_denial(ANONYMOUS, action, error)
                except KmsError as audit_error:
                    abort(context, audit_error)
                abort(context, error)
            call = CURRENT_CALL.get(None)
            if call is not None:
                call.actor = principal.name  # for the call's log line
            token = CURRENT_PRINCIPAL.set(principal)
            try:
                return behaviour(request, context)
            finally:
                CURRENT_PRINCIPAL.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            authenticated,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _authenticate(self, metadata: Any, context: grpc.ServicerContext) -> Principal:
        policy = self._policy.policy
        tokens = [value for key, value in metadata if key == "authorization"]
        if len(tokens) > 1:
            raise Unauthenticated("CREDENTIALS_AMBIGUOUS", "send one authorization header")
        if tokens:
            value = tokens[0]
            if not isinstance(value, str) or not value.lower().startswith(BEARER_PREFIX):
                raise Unauthenticated(
                    "CREDENTIALS_MALFORMED", "the authorization header must be 'Bearer <token>'"
                )
            principal = policy.principal_for_token(value[len(BEARER_PREFIX) :].strip())
            if principal is None:
                raise Unauthenticated("CREDENTIALS_INVALID", "the bearer token is not valid")
            return principal
        common_names = list(context.auth_context().get("x509_common_name", []))
        if common_names:
            name = bytes(common_names[0]).decode(errors="replace")
            principal = policy.principal_for_certificate(name)
            if principal is None:
                raise Unauthenticated(
                    "CERTIFICATE_NOT_MAPPED",
                    f"the client certificate (CN={name}) is not mapped to a principal",
                )
            return principal
        raise Unauthenticated(
            "CREDENTIALS_MISSING",
            "this call needs credentials: a bearer token or a client certificate",
        )


def _deny_all(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        abort(context, PermissionDenied("METHOD_NOT_ALLOWED", "this method is not allowed"))

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            deny, handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        lambda requests, context: deny(None, context),
        handler.request_deserializer,
        handler.response_serializer,
    )
