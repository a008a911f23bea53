"""The token buckets for calls that fail authentication, on a clock the test moves."""

from __future__ import annotations

import asyncio

from server.api.auth import (
    CURRENT_PRINCIPAL,
    Authenticator,
    AuthFailureLimits,
    FailureLimiter,
    PolicyHolder,
    peer_address,
)
from server.api.observability import CURRENT_CALL, CallInfo
from server.domain.model import Action
from server.policy import Policy, hash_token


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_peer_gets_its_burst_then_one_per_refill_interval() -> None:
    clock = Clock()
    limiter = FailureLimiter(AuthFailureLimits(burst=3, per_minute=60), clock)
    assert [limiter.allow("ipv4:10.0.0.1") for _ in range(5)] == [True] * 3 + [False] * 2
    clock.now += 1.0  # 60 per minute: one more per second
    assert [limiter.allow("ipv4:10.0.0.1") for _ in range(2)] == [True, False]
    clock.now += 3600  # refilled to the burst, never beyond
    assert sum(limiter.allow("ipv4:10.0.0.1") for _ in range(10)) == 3


def test_peers_do_not_share_a_bucket_but_all_peers_share_a_ceiling() -> None:
    clock = Clock()
    limits = AuthFailureLimits(burst=2, per_minute=60, all_peers_factor=3)
    limiter = FailureLimiter(limits, clock)
    allowed = [limiter.allow(f"ipv4:10.0.0.{n}") for n in range(10) for _ in range(2)]
    # Each new address brings its own burst of 2, but all together get 3 x 2.
    assert sum(allowed) == 6


def test_forgetting_peers_keeps_the_table_bounded() -> None:
    clock = Clock()
    limiter = FailureLimiter(AuthFailureLimits(burst=1, all_peers_factor=10**6, max_peers=4), clock)
    for n in range(100):
        limiter.allow(f"ipv6:[::{n}]")
    assert len(limiter._peers) <= 4


def test_the_peer_address_drops_the_port_of_the_connection() -> None:
    assert peer_address("ipv4:127.0.0.1:51234") == "ipv4:127.0.0.1"
    assert peer_address("ipv6:[::1]:51234") == "ipv6:[::1]"
    assert peer_address("unix:/run/kms.sock") == "unix:/run/kms.sock"


class _Context:
    """Only what authentication reads of a grpc.aio call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def test_the_caller_comes_from_the_calls_metadata_with_or_without_an_observer() -> None:
    """The observer hands authentication the metadata it read; a call it did not see (or
    one recorded without metadata) is authenticated from the context itself."""
    token = "a-token-of-the-agent"
    policy = Policy.parse(
        {
            "principals": {
                "agent": {
                    "auth": ["token"],
                    "token_sha256": [hash_token(token)],
                    "grants": [{"roles": ["backup"], "keys": ["*"]}],
                }
            }
        }
    )
    metadata = (("authorization", f"Bearer {token}"),)

    async def caller(request: object, context: object) -> str:
        return CURRENT_PRINCIPAL.get().name

    authenticated = Authenticator(PolicyHolder(policy), lambda *args: None).wrap(
        Action.ISSUE_DATA_KEY, caller
    )

    async def call(recorded: CallInfo | None) -> str:
        if recorded is not None:
            CURRENT_CALL.set(recorded)
        return str(await authenticated(None, _Context(metadata)))  # type: ignore[arg-type]

    method = "/kms.v1.KeyManagementService/GetActiveKey"
    assert asyncio.run(call(CallInfo(method, "r", metadata=metadata))) == "agent"
    assert asyncio.run(call(CallInfo(method, "r"))) == "agent"
    assert asyncio.run(call(None)) == "agent"
