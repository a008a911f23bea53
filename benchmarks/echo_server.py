"""The baseline: a bare grpcio unary server with exactly kms-server's server settings.

    python -m benchmarks.echo_server --listen 127.0.0.1:0 --ready-file FILE [--processes N]

Same model as kms-server (`grpc.server` over a ThreadPoolExecutor of 16
workers, the same receive limit, plaintext on loopback), no interceptor, no
proto: a generic handler takes the raw request bytes and replies with a fresh
32-byte key, like a data key. With `--processes N`, like `kms-server --processes N`:
N such servers accept on one port (SO_REUSEPORT, grpc's default on Linux), started
by this process, which holds the port and stops them on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

METHOD = "/bench.Echo/GetKey"
MAX_WORKERS = 16  # kms-server's default --max-workers
MAX_REQUEST_BYTES = 64 * 1024  # server.app.MAX_REQUEST_BYTES


def _get_key(request: bytes, context: grpc.ServicerContext) -> bytes:
    return os.urandom(32)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.echo_server")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    if args.processes > 1:
        return _supervise(args.listen, args.processes, args.ready_file)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_WORKERS),
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
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
    port = server.add_insecure_port(args.listen)
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    _write_ready(args.ready_file, f"{host}:{port}")
    _wait_for_sigterm()
    server.stop(1).wait()
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
