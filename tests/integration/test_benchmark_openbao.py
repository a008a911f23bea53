"""The benchmark's OpenBao peer against a real `bao server`: set up as the phase sets it up,
loaded for a moment by the same closed loop. Skipped when bao is not installed."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from benchmarks import openbao
from benchmarks.load import EventLoop


@pytest.fixture(scope="module")
def bao() -> Path:
    found = openbao.find_bao()
    if found is None:
        pytest.skip(openbao.MISSING)
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
