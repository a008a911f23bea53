"""The benchmark's OpenBao peer against a real `bao server`: set up as the phase sets it up,
loaded for a moment by the same closed loop. Skipped when bao is not installed."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

import pytest

from benchmarks import openbao
from benchmarks.load import EventLoop


@pytest.fixture(scope="module")
def bao() -> Path:
    found = openbao.find_bao()
    if found is None:
        pytest.skip(openbao.MISSING)
    if not openbao.has_client():
        pytest.skip(openbao.MISSING_CLIENT)
    return found


@pytest.mark.parametrize("storage", openbao.STORAGES)
def test_transit_datakey_then_decrypt_under_load_with_every_call_audited(
    bao: Path, tmp_path: Path, storage: str
) -> None:
    loop = EventLoop()
    try:
        with openbao.bao_server(bao, tmp_path, storage) as server:
            client = openbao.TransitClient(server, loop, connection_count=4)
            key = openbao.api(server.address, "GET", "transit/keys/bench", server.token)["data"]
            lines_before = server.audit_lines()
            ciphertexts: list[str] = []
            issued = loop.closed_loop(
                client.datakey(ciphertexts),
                in_flight=8,
                duration=0.3,
                warmup=0.0,
                server_pid=server.pid,
                failures=client.failures(),
            )
            resolved = loop.closed_loop(
                client.decrypt(ciphertexts[:10]),
                in_flight=8,
                duration=0.3,
                warmup=0.0,
                server_pid=server.pid,
                failures=client.failures(),
            )
            client.close()
            audit_lines = server.audit_lines() - lines_before
            last = json.loads(server.audit_log.read_text().splitlines()[-1])
    finally:
        loop.shutdown()

    assert (key["type"], sorted(key["keys"])) == ("aes256-gcm96", ["1", "2"])
    assert issued.errors == resolved.errors == 0
    assert issued.calls > 0 and resolved.calls > 0
    assert len(ciphertexts) == issued.calls
    assert all(c.startswith("vault:v2:") for c in ciphertexts)  # the rotated-to version
    assert issued.server_cpu_seconds > 0
    # A request and a response line per call.
    assert audit_lines == 2 * (issued.calls + resolved.calls)
    assert last["type"] == "response" and last["request"]["path"] == "transit/decrypt/bench"


def test_a_failed_call_counts_as_an_error_and_the_load_goes_on(bao: Path, tmp_path: Path) -> None:
    loop = EventLoop()
    try:
        with openbao.bao_server(bao, tmp_path, "dev") as server:
            client = openbao.TransitClient(server, loop, connection_count=1)
            forged = "vault:v1:" + base64.b64encode(b"\0" * 40).decode()
            result = loop.closed_loop(
                client.decrypt([forged]),
                in_flight=2,
                duration=0.2,
                warmup=0.0,
                server_pid=server.pid,
                failures=client.failures(),
            )
            client.close()
    finally:
        loop.shutdown()

    assert result.calls == 0
    assert result.errors > 1
    assert result.first_error.startswith("400")


def test_callers_take_the_connections_in_turn(tmp_path: Path) -> None:
    """More callers than connections: each caller gets turns, not a few of them all of them.

    Against aiohttp's own pool a caller that has just freed a connection takes it again,
    so the others' first calls would end only with the phase. A plain aiohttp server
    stands in for OpenBao here: no bao needed.
    """
    web = pytest.importorskip("aiohttp.web")
    loop = EventLoop()

    async def datakey(request: Any) -> Any:
        return web.json_response({"data": {"ciphertext": "vault:v2:x"}})

    async def serve() -> Any:
        app = web.Application()
        app.router.add_post("/v1/transit/datakey/plaintext/bench", datakey)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner

    runner = loop.run(serve())
    try:
        port = runner.addresses[0][1]
        stand_in = openbao.BaoProcess(
            address=f"127.0.0.1:{port}",
            process=cast(Any, None),
            log_path=tmp_path / "log",
            storage="dev",
            token="t",
            audit_log=tmp_path / "a",
        )
        client = openbao.TransitClient(stand_in, loop, connection_count=2)
        calls_by_caller: Counter[int] = Counter()
        make = client.datakey([])

        def counted(i: int) -> Awaitable[None]:
            calls_by_caller[id(asyncio.current_task())] += 1
            return make(i)

        result = loop.closed_loop(
            counted, in_flight=8, duration=1.0, warmup=0.0, server_pid=os.getpid(),
            failures=client.failures(),
        )  # fmt: skip
        client.close()
    finally:
        loop.run(runner.cleanup())
        loop.shutdown()

    assert result.errors == 0
    assert len(calls_by_caller) == 8
    # Starved callers would each have made exactly one call, at the end.
    assert min(calls_by_caller.values()) >= 2, calls_by_caller
