"""`python -m server.healthcheck [HOST:PORT]`: exit 0 when the server reports SERVING.

Used by the Dockerfile's HEALTHCHECK against the plaintext loopback port
given by --health-listen / KMS_HEALTH_LISTEN.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    address = args[0] if args else os.environ.get("KMS_HEALTH_LISTEN", "127.0.0.1:50052")
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="kms.v1.KeyManagementService"), timeout=3
            )
        except grpc.RpcError as error:
            print(f"unhealthy: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
