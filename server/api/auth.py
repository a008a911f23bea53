"""Authentication: turns a call's credentials into a Principal, or refuses the call.

Roles are checked by the service layer, which audits every refusal; a call
refused here for its credentials is audited through `record_denial`.
`server.api.pipeline` puts this around every kms.v1 method.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

import grpc

from server.api.errors import aborted
from server.api.observability import CURRENT_CALL, Behaviour
from server.domain.errors import KmsError, Unauthenticated
from server.domain.model import ANONYMOUS, Action, Principal
from server.policy import Policy

CURRENT_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")
BEARER_PREFIX = "bearer "


class PolicyHolder:
    """The current policy; replaced whole on reload, so readers never see half a policy."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy


class Authenticator:
    """Bearer token (`authorization` metadata) or client certificate CN -> Principal."""

    def __init__(
        self,
        policy: PolicyHolder,
        record_denial: Callable[[str, Action, KmsError], None],
    ) -> None:
        self._policy = policy
        self._record_denial = record_denial

    def wrap(self, action: Action, behaviour: Behaviour) -> Behaviour:
        """`behaviour` run as the authenticated caller (CURRENT_PRINCIPAL) or an audited refusal."""
        authenticate, record_denial = self._authenticate, self._record_denial

        async def authenticated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                principal = authenticate(context)
            except KmsError as error:
                try:
                    # A transaction of its own: on a thread, not on the event loop.
                    await asyncio.to_thread(record_denial, ANONYMOUS, action, error)
                except KmsError as audit_error:
                    raise aborted(audit_error) from None
                raise aborted(error) from None
            call = CURRENT_CALL.get(None)
            if call is not None:
                call.actor = principal.name  # for the call's log line
            token = CURRENT_PRINCIPAL.set(principal)
            try:
                return await behaviour(request, context)
            finally:
                CURRENT_PRINCIPAL.reset(token)

        return authenticated

    def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        policy = self._policy.policy
        metadata = context.invocation_metadata() or ()
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
