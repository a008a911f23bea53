"""A thin typed client of kms.v1.KeyManagementService shared by kmsctl, kms-backup, kms-restore.

Every call has a deadline; calls that are safe to repeat are retried with
exponential backoff on UNAVAILABLE; every `grpc.RpcError` becomes a `KmsError`.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kms.v1 import kms_pb2, kms_pb2_grpc

DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 4
ERROR_DOMAIN = "kms.v1"

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class KmsError(Exception):
    """A failed call: the status code, the ErrorInfo reason (may be empty) and the message."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(
            f"{code.name} {reason}: {message}" if reason else f"{code.name}: {message}"
        )
        self.code = code
        self.reason = reason
        self.message = message


class ConfigError(Exception):
    """The connection options are unusable (missing token file, cert without CA...)."""


@dataclass(frozen=True)
class ClientConfig:
    """How to reach and authenticate to the server."""

    addr: str = DEFAULT_ADDR
    token: str | None = None
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    def __repr__(self) -> str:
        # The token and private key must never end up in a log or traceback.
        return (
            f"ClientConfig(addr={self.addr!r}, token={'set' if self.token else None}, "
            f"tls={self.ca is not None}, client_cert={self.cert is not None}, "
            f"timeout={self.timeout}, retries={self.retries})"
        )


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """The options every program shares; defaults come from the KMS_* environment."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--addr",
        default=os.environ.get("KMS_ADDR", DEFAULT_ADDR),
        help="server host:port (env KMS_ADDR; default %(default)s)",
    )
    group.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get("KMS_TOKEN_FILE"),
        help="file holding the bearer token (env KMS_TOKEN_FILE; or set KMS_TOKEN)",
    )
    group.add_argument(
        "--ca",
        type=Path,
        default=os.environ.get("KMS_CA"),
        help="CA bundle; enables TLS (env KMS_CA)",
    )
    group.add_argument(
        "--cert",
        type=Path,
        default=os.environ.get("KMS_CERT"),
        help="client certificate (mTLS; env KMS_CERT)",
    )
    group.add_argument(
        "--tls-key", dest="tls_key", type=Path, default=os.environ.get("KMS_KEY"),
        help="client private key (mTLS; env KMS_KEY). Not --key: that names the KMS key",
    )  # fmt: skip
    group.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("KMS_TIMEOUT", DEFAULT_TIMEOUT)),
        help="deadline of each call in seconds (default %(default)s)",
    )
    group.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="retries of safe calls while the server is unavailable (default %(default)s)",
    )


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def config_from_args(args: argparse.Namespace) -> ClientConfig:
    """Build the config from `add_connection_args` options (token file wins over KMS_TOKEN)."""
    token: str | None
    if args.token_file is not None:
        token = _read_file(Path(args.token_file), "token file").decode().strip()
        if not token:
            raise ConfigError(f"token file {args.token_file} is empty")
    else:
        token = os.environ.get("KMS_TOKEN") or None
    if (args.cert is None) != (args.tls_key is None):
        raise ConfigError("--cert and --tls-key must be given together")
    if args.cert is not None and args.ca is None:
        raise ConfigError("--cert/--tls-key need --ca: client certificates only work over TLS")
    if not args.addr.strip():
        raise ConfigError("the server address is empty (check --addr / KMS_ADDR)")
    if args.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    if args.retries < 0:
        raise ConfigError("--retries must not be negative")
    return ClientConfig(
        addr=args.addr,
        token=token,
        ca=_read_file(Path(args.ca), "CA file") if args.ca is not None else None,
        cert=_read_file(Path(args.cert), "certificate") if args.cert is not None else None,
        key=_read_file(Path(args.tls_key), "private key") if args.tls_key is not None else None,
        timeout=args.timeout,
        retries=args.retries,
    )


def _error_from_rpc(error: grpc.RpcError) -> KmsError:
    """Turn an RpcError into a KmsError, reading the AIP-193 ErrorInfo when there is one."""
    if not isinstance(error, grpc.Call):
        return KmsError(grpc.StatusCode.UNKNOWN, "", str(error))
    code = error.code()
    message = error.details() or ""
    reason = ""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # the rich status disagrees with the call's own status
        status = None
    if status is not None:
        message = status.message or message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                break
    return KmsError(code, reason, message)


class KmsClient:
    """One channel to the server; use as a context manager to close it."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._sleep = sleep
        if config.ca is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=config.ca,
                private_key=config.key,
                certificate_chain=config.cert,
            )
            self._channel = grpc.secure_channel(config.addr, credentials)
        else:
            self._channel = grpc.insecure_channel(config.addr)
        self._stub = kms_pb2_grpc.KeyManagementServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str | bytes], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KmsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        *,
        retry: bool,
    ) -> _Response:
        """The one place RpcErrors are caught; only calls safe to repeat are retried."""
        attempts = 1 + (self.config.retries if retry else 0)
        for attempt in range(attempts):
            try:
                return method(request, timeout=self.config.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                error = _error_from_rpc(exc)
                if error.code is not grpc.StatusCode.UNAVAILABLE or attempt + 1 == attempts:
                    raise error from None
            # Full jitter keeps many clients from retrying in lockstep.
            self._sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))
        raise AssertionError("unreachable")

    # Not retried: repeating a write could register or rotate twice.
    def register_key_version(
        self, key_name: str, *, imported_material: bytes = b"", activate: bool = False
    ) -> kms_pb2.KeyVersion:
        request = kms_pb2.RegisterKeyVersionRequest(
            key_name=key_name,
            imported_material=imported_material,
            activate_first_version=activate,
        )
        return self._call(self._stub.RegisterKeyVersion, request, retry=False).key_version

    def rotate_active(
        self,
        key_name: str,
        to_version: int,
        *,
        expected_active_version: int | None = None,
        reason: str = "",
    ) -> kms_pb2.RotateActiveResponse:
        request = kms_pb2.RotateActiveRequest(
            key_name=key_name, to_version=to_version, reason=reason
        )
        if expected_active_version is not None:
            request.expected_active_version = expected_active_version
        return self._call(self._stub.RotateActive, request, retry=False)

    def disable_key_version(
        self, key_name: str, version: int, *, reason: str = ""
    ) -> kms_pb2.KeyVersion:
        request = kms_pb2.DisableKeyVersionRequest(
            key_name=key_name, version=version, reason=reason
        )
        return self._call(self._stub.DisableKeyVersion, request, retry=False).key_version

    def enable_key_version(
        self, key_name: str, version: int, *, reason: str = ""
    ) -> kms_pb2.KeyVersion:
        request = kms_pb2.EnableKeyVersionRequest(key_name=key_name, version=version, reason=reason)
        return self._call(self._stub.EnableKeyVersion, request, retry=False).key_version

    def destroy_key_version(
        self, key_name: str, version: int, *, reason: str = ""
    ) -> kms_pb2.KeyVersion:
        request = kms_pb2.DestroyKeyVersionRequest(
            key_name=key_name, version=version, reason=reason
        )
        return self._call(self._stub.DestroyKeyVersion, request, retry=False).key_version

    def preview_destroy(self, key_name: str, version: int) -> kms_pb2.KeyVersion:
        """What destroying the version would do (due time, backups lost); changes nothing."""
        request = kms_pb2.DestroyKeyVersionRequest(
            key_name=key_name, version=version, validate_only=True
        )
        return self._call(self._stub.DestroyKeyVersion, request, retry=True).key_version

    def cancel_key_version_destruction(
        self, key_name: str, version: int, *, reason: str = ""
    ) -> kms_pb2.KeyVersion:
        request = kms_pb2.CancelKeyVersionDestructionRequest(
            key_name=key_name, version=version, reason=reason
        )
        return self._call(self._stub.CancelKeyVersionDestruction, request, retry=False).key_version

    def rewrap_backups(
        self, key_name: str, from_version: int, batch_size: int = 0
    ) -> kms_pb2.RewrapBackupsResponse:
        """One batch; idempotent, so retried like a read."""
        request = kms_pb2.RewrapBackupsRequest(
            key_name=key_name, from_version=from_version, batch_size=batch_size
        )
        return self._call(self._stub.RewrapBackups, request, retry=True)

    def approve_key_version_destruction(
        self, key_name: str, version: int, *, reason: str = ""
    ) -> kms_pb2.KeyVersion:
        request = kms_pb2.ApproveKeyVersionDestructionRequest(
            key_name=key_name, version=version, reason=reason
        )
        return self._call(self._stub.ApproveKeyVersionDestruction, request, retry=False).key_version

    def update_key(self, key_name: str, rotation_period_seconds: int) -> kms_pb2.Key:
        request = kms_pb2.UpdateKeyRequest(
            key_name=key_name, rotation_period_seconds=rotation_period_seconds
        )
        return self._call(self._stub.UpdateKey, request, retry=True).key

    def iter_backups(self, key_name: str, version: int = 0) -> Iterator[kms_pb2.Backup]:
        page_token = ""
        while True:
            request = kms_pb2.ListBackupsRequest(
                key_name=key_name, version=version, page_size=1000, page_token=page_token
            )
            response = self._call(self._stub.ListBackups, request, retry=True)
            yield from response.backups
            page_token = response.next_page_token
            if not page_token:
                return

    # Retried: GetActiveKey is idempotent per backup id, the rest are reads.
    def get_active_key(self, key_name: str, backup_id: str) -> kms_pb2.GetActiveKeyResponse:
        request = kms_pb2.GetActiveKeyRequest(key_name=key_name, backup_id=backup_id)
        return self._call(self._stub.GetActiveKey, request, retry=True)

    def resolve_key_for_backup(
        self, backup_id: str, recovery: kms_pb2.BackupKeyReference | None = None
    ) -> kms_pb2.ResolveKeyForBackupResponse:
        request = kms_pb2.ResolveKeyForBackupRequest(backup_id=backup_id, recovery=recovery)
        return self._call(self._stub.ResolveKeyForBackup, request, retry=True)

    def get_key_version(self, key_name: str, version: int) -> kms_pb2.KeyVersion:
        request = kms_pb2.GetKeyVersionRequest(key_name=key_name, version=version)
        return self._call(self._stub.GetKeyVersion, request, retry=True).key_version

    def list_key_versions(self, key_name: str) -> list[kms_pb2.KeyVersion]:
        request = kms_pb2.ListKeyVersionsRequest(key_name=key_name)
        return list(self._call(self._stub.ListKeyVersions, request, retry=True).key_versions)

    def iter_keys(self, page_size: int = 0) -> Iterator[kms_pb2.Key]:
        page_token = ""
        while True:
            request = kms_pb2.ListKeysRequest(page_size=page_size, page_token=page_token)
            response = self._call(self._stub.ListKeys, request, retry=True)
            yield from response.keys
            page_token = response.next_page_token
            if not page_token:
                return

    def iter_audit_events(
        self, *, key_name: str = "", page_size: int = 0, after_sequence: int = 0
    ) -> Iterator[kms_pb2.AuditEvent]:
        """Events in sequence order, from the one after `after_sequence`."""
        page_token = str(after_sequence) if after_sequence else ""
        while True:
            request = kms_pb2.ListAuditEventsRequest(
                page_size=page_size, page_token=page_token, key_name=key_name
            )
            response = self._call(self._stub.ListAuditEvents, request, retry=True)
            yield from response.events
            page_token = response.next_page_token
            if not page_token:
                return

    def verify_audit_log(self) -> kms_pb2.VerifyAuditLogResponse:
        return self._call(self._stub.VerifyAuditLog, kms_pb2.VerifyAuditLogRequest(), retry=True)

    def get_audit_checkpoint(self, sequence: int = 0) -> kms_pb2.AuditCheckpoint:
        request = kms_pb2.GetAuditCheckpointRequest(sequence=sequence)
        return self._call(self._stub.GetAuditCheckpoint, request, retry=True).checkpoint

    def get_audit_public_key(self) -> kms_pb2.GetAuditPublicKeyResponse:
        request = kms_pb2.GetAuditPublicKeyRequest()
        return self._call(self._stub.GetAuditPublicKey, request, retry=True)
