"""Authentication: turns a call's credentials into a Principal, or refuses the call.

Roles are checked by the service layer, which audits every refusal; a call
refused here for its credentials is audited through `record_denial`.
`server.api.pipeline` puts this around every kms.v1 method.

Calls failing authentication are rate-limited per peer address (a token bucket,
and one for all peers together): within the limit each is refused
UNAUTHENTICATED and audited on its own; beyond it each is refused
RESOURCE_EXHAUSTED at once, without touching the database, and counted, and the
count becomes one summary audit event per peer per interval. Anonymous clients
cannot grow the audit log (and fill the disk) faster than the limits allow.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from server.api.errors import aborted
from server.api.observability import CURRENT_CALL, Behaviour, CallInfo
from server.domain.errors import KmsError, ResourceExhausted, Unauthenticated
from server.domain.model import ANONYMOUS, Action, Principal
from server.policy import Policy

log = logging.getLogger(__name__)

CURRENT_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")
BEARER_PREFIX = "bearer "


class PolicyHolder:
    """The current policy; replaced whole on reload, so readers never see half a policy."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy


@dataclass(frozen=True)
class AuthFailureLimits:
    """How many calls failing authentication are answered and audited one by one."""

    burst: int = 10  # per peer address, at once
    per_minute: int = 60  # per peer address, refilled continuously
    summary_seconds: int = 60  # one summary audit event per peer per this many seconds
    # All peers together get ALL_PEERS_FACTOR times one peer's allowance: an attacker
    # with many addresses still has a ceiling.
    all_peers_factor: int = 10
    max_peers: int = 10_000  # buckets kept; beyond, full ones are forgotten


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class FailureLimiter:
    """Token buckets for calls that fail authentication, per peer and for all peers."""

    def __init__(
        self, limits: AuthFailureLimits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._rate = limits.per_minute / 60.0
        self._peers: dict[str, _Bucket] = {}
        now = clock()
        self._all = _Bucket(float(limits.burst * limits.all_peers_factor), now)

    def allow(self, peer: str) -> bool:
        """Takes one failure from the peer's allowance; False once it (or everyone's) is spent."""
        limits, now = self._limits, self._clock()
        bucket = self._peers.get(peer)
        if bucket is None:
            if len(self._peers) >= limits.max_peers:
                self._forget_full(now)
            bucket = self._peers[peer] = _Bucket(float(limits.burst), now)
        _refill(bucket, now, self._rate, limits.burst)
        everyone = self._all
        factor = limits.all_peers_factor
        _refill(everyone, now, self._rate * factor, limits.burst * factor)
        if bucket.tokens < 1 or everyone.tokens < 1:
            return False
        bucket.tokens -= 1
        everyone.tokens -= 1
        return True

    def _forget_full(self, now: float) -> None:
        limits = self._limits
        for peer, bucket in list(self._peers.items()):
            _refill(bucket, now, self._rate, limits.burst)
            if bucket.tokens >= limits.burst:
                del self._peers[peer]
        if len(self._peers) >= limits.max_peers:
            self._peers.clear()  # the all-peers bucket still holds the line


def _refill(bucket: _Bucket, now: float, rate: float, capacity: int) -> None:
    bucket.tokens = min(float(capacity), bucket.tokens + (now - bucket.updated) * rate)
    bucket.updated = now


def peer_address(peer: str) -> str:
    """ipv4:10.0.0.1:51234 -> ipv4:10.0.0.1 (the port changes with every connection)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


class Authenticator:
    """Bearer token (`authorization` metadata) or client certificate CN -> Principal."""

    def __init__(
        self,
        policy: PolicyHolder,
        record_denial: Callable[[str, Action, KmsError], None],
        limits: AuthFailureLimits | None = None,
    ) -> None:
        self._policy = policy
        self._record_denial = record_denial
        self._limits = limits or AuthFailureLimits()
        self._limiter = FailureLimiter(self._limits)
        # peer -> [calls refused, first and last time (us)], until the next summary.
        self._refused: dict[str, list[int]] = {}
        self._refused_lock = threading.Lock()
        self._summary_due = False

    def wrap(self, action: Action, behaviour: Behaviour) -> Behaviour:
        """`behaviour` run as the authenticated caller (CURRENT_PRINCIPAL) or an audited refusal."""
        authenticate, record_denial = self._authenticate, self._record_denial
        limiter, limited = self._limiter, self._limited

        async def authenticated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = CURRENT_CALL.get(None)
            try:
                principal = authenticate(context, call)
            except KmsError as error:
                peer = peer_address(context.peer())
                if not limiter.allow(peer):
                    raise aborted(limited(peer)) from None
                try:
                    # A transaction of its own: on a thread, not on the event loop.
                    await asyncio.to_thread(record_denial, ANONYMOUS, action, error)
                except KmsError as audit_error:
                    raise aborted(audit_error) from None
                raise aborted(error) from None
            if call is not None:
                call.actor = principal.name  # for the call's log line
            token = CURRENT_PRINCIPAL.set(principal)
            try:
                return await behaviour(request, context)
            finally:
                CURRENT_PRINCIPAL.reset(token)

        return authenticated

    def _limited(self, peer: str) -> ResourceExhausted:
        """Counts a call refused beyond the limit for the peer's next summary event."""
        now = time.time_ns() // 1000
        with self._refused_lock:
            counts = self._refused.get(peer)
            if counts is None:
                self._refused[peer] = [1, now, now]
            else:
                counts[0] += 1
                counts[2] = now
            due, self._summary_due = self._summary_due, True
        if not due:
            loop = asyncio.get_running_loop()
            loop.call_later(self._limits.summary_seconds, self._summarise_soon)
        return ResourceExhausted(
            "UNAUTHENTICATED_RATE_LIMITED",
            "too many calls from this address failed authentication; retry later with valid "
            "credentials",
        )

    def _summarise_soon(self) -> None:
        # On the loop: the audit write is a transaction, so it goes to a thread.
        asyncio.get_running_loop().run_in_executor(None, self.flush)

    def flush(self) -> None:
        """Writes one summary audit event per peer for the calls refused since the last one."""
        with self._refused_lock:
            refused, self._refused = self._refused, {}
            self._summary_due = False
        for peer, (count, first_us, last_us) in refused.items():
            summary = ResourceExhausted(
                "UNAUTHENTICATED_RATE_LIMITED",
                f"{count} unauthenticated calls from {peer} refused between "
                f"{_utc(first_us)} and {_utc(last_us)}",
            )
            try:
                self._record_denial(ANONYMOUS, Action.UNAUTHENTICATED_SUMMARY, summary)
            except KmsError as error:
                log.error(
                    "could not audit %s (%s): %s", summary.message, error.reason, error.message
                )

    def _authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any], call: CallInfo | None
    ) -> Principal:
        policy = self._policy.policy
        # The observer has read the metadata already (each read builds it anew); a call
        # without it (no observer) reads the context's.
        metadata = (call.metadata if call is not None else ()) or (
            context.invocation_metadata() or ()
        )
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


def _utc(us: int) -> str:
    seconds, micros = divmod(us, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros // 1000:03d}Z"
