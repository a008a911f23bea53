"""A thin typed client of kms.v1.KeyManagementService shared by kmsctl, kms-backup, kms-restore.

Every call has a deadline; calls that are safe to repeat are retried with
exponential backoff on UNAVAILABLE; every `grpc.RpcError` becomes a `KmsError`.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping
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


MAX_RETRIES = 10
MAX_TIMEOUT_SECONDS = 86_400.0
# Sizes far above any real token or PEM bundle, so /dev/zero cannot fill memory.
MAX_TOKEN_FILE_BYTES = 4096
MAX_PEM_FILE_BYTES = 1 << 20
# A bearer token travels in gRPC metadata: visible ASCII only, one line.
TOKEN_PATTERN = re.compile(r"[\x21-\x7e]{1,1024}")
# gRPC target schemes passed through as they are (after the ASCII check).
TARGET_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:")

# (option, attribute, environment variable, default); resolved in config_from_args, so a
# bad environment variable is reported by name instead of failing while building --help.
CONNECTION_SETTINGS = [
    ("--addr", "addr", "KMS_ADDR", DEFAULT_ADDR),
    ("--token-file", "token_file", "KMS_TOKEN_FILE", None),
    ("--ca", "ca", "KMS_CA", None),
    ("--cert", "cert", "KMS_CERT", None),
    ("--tls-key", "tls_key", "KMS_KEY", None),
    ("--timeout", "timeout", "KMS_TIMEOUT", str(DEFAULT_TIMEOUT)),
    ("--retries", "retries", "KMS_RETRIES", str(DEFAULT_RETRIES)),
]


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """The options every program shares. Their defaults are SUPPRESSed, so a program may add
    them both before and after its subcommand; `config_from_args` fills in the rest."""
    group = parser.add_argument_group("connection")
    keep = argparse.SUPPRESS
    group.add_argument(
        "--addr", default=keep, metavar="HOST:PORT",
        help=f"server address (env KMS_ADDR; default {DEFAULT_ADDR})",
    )  # fmt: skip
    group.add_argument(
        "--token-file", default=keep, metavar="FILE",
        help="file holding the bearer token (env KMS_TOKEN_FILE; or set KMS_TOKEN)",
    )  # fmt: skip
    group.add_argument(
        "--ca", default=keep, metavar="FILE", help="CA bundle; enables TLS (env KMS_CA)"
    )
    group.add_argument(
        "--cert", default=keep, metavar="FILE", help="client certificate (mTLS; env KMS_CERT)"
    )
    group.add_argument(
        "--tls-key", dest="tls_key", default=keep, metavar="FILE",
        help="client private key (mTLS; env KMS_KEY). Not --key: that names the KMS key",
    )  # fmt: skip
    group.add_argument(
        "--timeout", default=keep, metavar="SECONDS",
        help=f"deadline of each call (env KMS_TIMEOUT; default {DEFAULT_TIMEOUT:g}, "
        f"at most {MAX_TIMEOUT_SECONDS:g})",
    )  # fmt: skip
    group.add_argument(
        "--retries", default=keep, metavar="N",
        help=f"retries of safe calls while the server is unavailable (env KMS_RETRIES; "
        f"default {DEFAULT_RETRIES}, at most {MAX_RETRIES})",
    )  # fmt: skip


def _setting(
    args: argparse.Namespace, environ: Mapping[str, str], option: str, attribute: str, env: str
) -> tuple[str | None, str]:
    """The raw value and the name to blame for it: the option if given, else the variable."""
    given = getattr(args, attribute, None)
    if given is not None:
        return str(given), option
    raw = environ.get(env)
    return (raw if raw != "" else None), env


def _text(raw: str, name: str) -> str:
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{name} is not valid UTF-8") from None
    return raw


def check_address(addr: str, name: str = "--addr") -> str:
    """host:port with a port from 1 to 65535 (gRPC would wrap 99999), or a gRPC target."""
    if not addr.strip():
        raise ConfigError(f"{name} is empty; give host:port")
    if not addr.isascii() or not addr.isprintable() or any(c.isspace() for c in addr):
        raise ConfigError(f"{name} must be host:port in printable ASCII, not {addr!r}")
    if addr.startswith(TARGET_SCHEMES) and not addr.startswith(("ipv4:", "ipv6:", "dns:")):
        return addr
    targets = [addr]
    if addr.startswith(TARGET_SCHEMES):  # ipv4:a:1,b:2 and dns:///host:port
        targets = addr.split(":", 1)[1].lstrip("/").split(",")
    for target in targets:
        host, sep, port = target.rpartition(":")
        if (
            not sep
            or not host.strip("[]")
            or not (port.isascii() and port.isdigit())
            or not 1 <= int(port) <= 65535
        ):
            raise ConfigError(f"{name} must be host:port with a port from 1 to 65535, not {addr!r}")
    return addr


def check_token(token: str, where: str) -> str:
    if TOKEN_PATTERN.fullmatch(token) is None:
        raise ConfigError(
            f"{where} must hold one bearer token: 1 to 1024 visible ASCII characters on one line"
        )
    return token


def read_file_setting(path: Path, what: str, limit: int) -> bytes:
    """A regular file of at most `limit` bytes (FIFOs and /dev/zero are refused, not read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        data = b""
        while len(data) <= limit:
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) > limit:
            raise ConfigError(f"{what} {path} is larger than {limit} bytes")
        return data
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ClientConfig:
    """Build the config from `add_connection_args` options, then the KMS_* environment.

    Every value is checked here, and a bad one names the option or variable it came from.
    The token file wins over KMS_TOKEN.
    """
    env = os.environ if environ is None else environ
    values: dict[str, tuple[str | None, str]] = {
        attribute: _setting(args, env, option, attribute, variable)
        for option, attribute, variable, _ in CONNECTION_SETTINGS
    }
    for option, attribute, _, default in CONNECTION_SETTINGS:
        if values[attribute][0] is None and default is not None:
            values[attribute] = (default, option)
    for raw, name in values.values():
        if raw is not None:
            _text(raw, name)

    addr_raw, addr_name = values["addr"]
    addr = check_address(addr_raw or "", addr_name)
    timeout_raw, timeout_name = values["timeout"]
    timeout = _seconds(timeout_raw or "", timeout_name)
    retries_raw, retries_name = values["retries"]
    retries_text = retries_raw or ""
    if not (retries_text.isascii() and retries_text.isdigit()) or int(retries_text) > MAX_RETRIES:
        raise ConfigError(
            f"{retries_name} must be a whole number from 0 to {MAX_RETRIES}, not {retries_text!r}"
        )

    token: str | None
    token_file, token_file_name = values["token_file"]
    if token_file is not None:
        data = read_file_setting(
            Path(token_file), f"token file ({token_file_name})", MAX_TOKEN_FILE_BYTES
        )
        text = data.decode("ascii", errors="replace").strip()
        if not text:
            raise ConfigError(f"token file {token_file} is empty")
        token = check_token(text, f"token file ({token_file_name}) {token_file}")
    else:
        raw_token = env.get("KMS_TOKEN") or None
        token = check_token(raw_token.strip(), "KMS_TOKEN") if raw_token else None

    ca, cert, key = values["ca"][0], values["cert"][0], values["tls_key"][0]
    if (cert is None) != (key is None):
        raise ConfigError("--cert and --tls-key (KMS_CERT, KMS_KEY) must be given together")
    if cert is not None and ca is None:
        raise ConfigError("--cert/--tls-key need --ca: client certificates only work over TLS")

    def pem(attribute: str) -> bytes | None:
        path, name = values[attribute]
        return read_file_setting(Path(path), name, MAX_PEM_FILE_BYTES) if path else None

    ca_pem, cert_pem, key_pem = pem("ca"), pem("cert"), pem("tls_key")
    check_pem(ca_pem, cert_pem, key_pem, values)
    return ClientConfig(
        addr=addr,
        token=token,
        ca=ca_pem,
        cert=cert_pem,
        key=key_pem,
        timeout=timeout,
        retries=int(retries_text),
    )


def check_pem(
    ca: bytes | None,
    cert: bytes | None,
    key: bytes | None,
    names: Mapping[str, tuple[str | None, str]],
) -> None:
    """Checked here, so a mistake names the file instead of gRPC logging its own lines."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def certificates(data: bytes, attribute: str) -> list[x509.Certificate]:
        path, name = names[attribute]
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ConfigError(f"{name} {path} holds no PEM certificate") from None

    if ca is not None:
        certificates(ca, "ca")
    if cert is not None and key is not None:
        first = certificates(cert, "cert")[0]
        key_path, key_name = names["tls_key"]
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError):
            raise ConfigError(
                f"{key_name} {key_path} holds no unencrypted PEM private key"
            ) from None
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if first.public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
            raise ConfigError(
                f"the certificate {names['cert'][0]} does not belong to the private key {key_path}"
            )


def _seconds(raw: str, name: str) -> float:
    try:
        value = float(raw) if raw.isascii() else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_SECONDS:
        raise ConfigError(
            f"{name} must be a number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS:g}, "
            f"not {raw!r}"
        )
    return value


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
        """Events in sequence order, those after `after_sequence` only.

        A page token is the last sequence of the previous page as a decimal string
        (server/domain/model.check_page_token), so starting after a sequence is one.
        """
        page_token = str(after_sequence) if after_sequence > 0 else ""
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
