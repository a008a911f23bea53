"""The baseline: a bare grpcio unary server with exactly kms-server's server settings.

    python -m benchmarks.echo_server --listen 127.0.0.1:0 --ready-file FILE

Same model as kms-server (`grpc.server` over a ThreadPoolExecutor of 16
workers, the same receive limit, plaintext on loopback), no interceptor, no
proto: a generic handler takes the raw request bytes and replies with a fresh
32-byte key, like a data key.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
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
    args = parser.parse_args()
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
    temporary = args.ready_file.with_name(args.ready_file.name + ".tmp")
    temporary.write_text(f"{host}:{port}")
    temporary.replace(args.ready_file)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    stopping.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
