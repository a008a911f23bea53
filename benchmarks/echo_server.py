"""The baseline: a bare grpcio unary server with exactly kms-server's server settings.

    python -m benchmarks.echo_server --listen 127.0.0.1:0 --ready-file FILE [--processes N]

Same model and settings as kms-server (a `grpc.aio` server on one event loop,
the same receive limit and cap on calls in progress, plaintext on loopback), no
pipeline, no proto: a coroutine takes the raw request bytes and replies with a
fresh 32-byte key, like a data key. With `--processes N`, like `kms-server --processes N`:
N such servers accept on one port (SO_REUSEPORT, grpc's default on Linux), started
by this process, which holds the port and stops them on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from server.thread_names import name_grpc_poller, name_os_thread

METHOD = "/bench.Echo/GetKey"
MAX_REQUEST_BYTES = 64 * 1024  # server.app.MAX_REQUEST_BYTES
MAX_CONCURRENT_RPCS = 256  # kms-server's default --max-concurrent-rpcs


async def _get_key(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return os.urandom(32)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.echo_server")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    if args.processes > 1:
        return _supervise(args.listen, args.processes, args.ready_file)
    return asyncio.run(_serve(args.listen, args.ready_file))


async def _serve(listen: str, ready_file: Path) -> int:
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "GetKey": grpc.unary_unary_rpc_method_handler(
                _get_key, request_deserializer=None, response_serializer=None
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    # Named as kms-server's are, so the benchmark's CPU per thread compares like with like.
    threading.current_thread().name = "echo-event-loop"
    name_os_thread()
    name_grpc_poller()
    host = listen.rsplit(":", 1)[0]
    _write_ready(ready_file, f"{host}:{port}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(1)
    return 0


def _supervise(listen: str, processes: int, ready_file: Path) -> int:
    host, _, port_text = listen.rpartition(":")
    holder = socket.socket()  # bound, never listening: keeps the port, gets no connections
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, int(port_text)))
    address = f"{host}:{holder.getsockname()[1]}"
    readies = [ready_file.with_name(f"{ready_file.name}.{index}") for index in range(processes)]
    command = [sys.executable, "-m", "benchmarks.echo_server", "--listen", address]
    children = [subprocess.Popen([*command, "--ready-file", str(ready)]) for ready in readies]
    while not all(ready.exists() for ready in readies):
        if any(child.poll() is not None for child in children):
            raise SystemExit("an echo server process exited at start")
        time.sleep(0.02)
    _write_ready(ready_file, address)
    _wait_for_sigterm()
    for child in children:
        child.send_signal(signal.SIGTERM)
    for child in children:
        child.wait()
    holder.close()
    return 0


def _write_ready(ready_file: Path, address: str) -> None:
    temporary = ready_file.with_name(ready_file.name + ".tmp")
    temporary.write_text(address)
    temporary.replace(ready_file)


def _wait_for_sigterm() -> None:
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    stopping.wait()


if __name__ == "__main__":
    raise SystemExit(main())
