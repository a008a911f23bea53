"""Server settings: a frozen dataclass loaded from flags and `KMS_*` environment variables.

Flags win over the environment. Nothing happens at import time; loading only
parses and checks, and names the setting when something is wrong.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:50051"


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


@dataclass(frozen=True)
class ServerSettings:
    listen: str
    data_dir: Path
    database_url: str
    root_key_file: Path
    policy_file: Path
    tls_cert: Path | None
    tls_key: Path | None
    tls_client_ca: Path | None
    insecure: bool
    dev: bool
    max_workers: int
    db_pool_size: int
    ready_file: Path | None
    log_level: str
    health_listen: str | None = None
    max_concurrent_rpcs: int = 256
    metrics_listen: str | None = None
    log_format: str = "json"
    db_statement_timeout_ms: int = 5000
    shutdown_grace_seconds: int = 10
    processes: int = 1
    # Set (internally) in each process a `--processes` supervisor starts.
    process_index: int | None = None
    audit_file: Path | None = None
    material_cache_seconds: int = 60
    # Root keys beyond --root-key-file (server.root_keys): a file path or a pkcs11: URI each.
    root_key: str | None = None
    previous_root_keys: tuple[str, ...] = ()
    pkcs11_module: Path | None = None
    pkcs11_pin_file: Path | None = None
    pkcs11_pin: str | None = field(default=None, repr=False)

    @property
    def uses_tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def upgrades_own_schema(self) -> bool:
        """The embedded default and dev mode migrate their own schema; a shared production
        database is migrated deliberately with `kms-server migrate`."""
        return self.dev or self.database_url.startswith("sqlite")

    def address(self, port: int) -> str:
        """host:port of the listen host with the port actually bound (IPv6 in brackets)."""
        host = listen_host(self.listen)
        return f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"


# (flag, environment variable, help) for every setting; the README lists the same.
_SETTINGS: list[tuple[str, str, str]] = [
    ("--listen", "KMS_LISTEN", f"host:port to listen on (default {DEFAULT_LISTEN})"),
    ("--data-dir", "KMS_DATA_DIR", "directory for the embedded database and dev-mode files"),
    ("--database-url", "KMS_DATABASE_URL", "SQLAlchemy URL (default: SQLite in --data-dir)"),
    ("--root-key-file", "KMS_ROOT_KEY_FILE", "32-byte root key file (default DATA_DIR/root.key)"),
    (
        "--root-key",
        "KMS_ROOT_KEY",
        "the current root key: pkcs11:token=LABEL;object=LABEL (an HSM key) or a file path; "
        "overrides --root-key-file",
    ),
    ("--pkcs11-module", "KMS_PKCS11_MODULE", "the PKCS#11 module (.so) of a pkcs11: root key"),
    (
        "--pkcs11-pin-file",
        "KMS_PKCS11_PIN_FILE",
        "file holding the token's user PIN (or set KMS_PKCS11_PIN)",
    ),
    (
        "--policy-file",
        "KMS_POLICY_FILE",
        "principals and roles, TOML (default DATA_DIR/policy.toml)",
    ),
    ("--tls-cert", "KMS_TLS_CERT", "server certificate chain (PEM)"),
    ("--tls-key", "KMS_TLS_KEY", "server private key (PEM)"),
    ("--tls-client-ca", "KMS_TLS_CLIENT_CA", "CA bundle for client certificates (mutual TLS)"),
    (
        "--max-workers",
        "KMS_MAX_WORKERS",
        "threads for the calls that block on the database, all but GetActiveKey and "
        "ResolveKeyForBackup, per process (default 16)",
    ),
    (
        "--processes",
        "KMS_PROCESSES",
        "server processes sharing the port (SO_REUSEPORT); 'auto': one per CPU (default 1)",
    ),
    ("--db-pool-size", "KMS_DB_POOL_SIZE", "database connections per process (default 10)"),
    (
        "--db-statement-timeout-ms",
        "KMS_DB_STATEMENT_TIMEOUT_MS",
        "PostgreSQL statement timeout in milliseconds (default 5000)",
    ),
    (
        "--shutdown-grace-seconds",
        "KMS_SHUTDOWN_GRACE_SECONDS",
        "how long calls in flight may take to finish at shutdown (default 10)",
    ),
    ("--ready-file", "KMS_READY_FILE", "write the bound host:port here once serving"),
    ("--log-level", "KMS_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR (default INFO)"),
    ("--health-listen", "KMS_HEALTH_LISTEN", "loopback host:port serving only grpc.health.v1"),
    (
        "--max-concurrent-rpcs",
        "KMS_MAX_CONCURRENT_RPCS",
        "calls in progress at once; more are refused with RESOURCE_EXHAUSTED (default 256)",
    ),
    (
        "--metrics-listen",
        "KMS_METRICS_LISTEN",
        "host:port serving Prometheus metrics over HTTP (default: off)",
    ),
    ("--log-format", "KMS_LOG_FORMAT", "json (one object per line, the default) or text"),
    (
        "--audit-file",
        "KMS_AUDIT_FILE",
        "also append every audit event to this file as a JSON line, fsynced before the reply; "
        "calls fail closed when it cannot be written; SIGHUP reopens it (default: off)",
    ),
    (
        "--material-cache-seconds",
        "KMS_MATERIAL_CACHE_SECONDS",
        "how long unwrapped version material may stay in memory, 0 to 60 (default 60)",
    ),
]
_FLAGS = [
    ("--insecure", "KMS_INSECURE", "allow plaintext on a loopback address"),
    ("--dev", "KMS_DEV", "first-run mode: create a root key, policy and tokens"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, env, text in _SETTINGS:
        parser.add_argument(flag, help=f"{text} [{env}]")
    for flag, env, text in _FLAGS:
        parser.add_argument(flag, action="store_true", default=None, help=f"{text} [{env}]")
    parser.add_argument(
        "--previous-root-key-file",
        action="append",
        metavar="FILE_OR_URI",
        help="an older root key that only unwraps, during a rotation; repeatable; a file or a "
        "pkcs11: URI [KMS_PREVIOUS_ROOT_KEY_FILES, comma-separated]",
    )


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerSettings:
    def value(flag: str, env: str) -> str | None:
        given = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        return given if given is not None else environ.get(env)

    def switch(flag: str, env: str) -> bool:
        given = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if given:
            return True
        raw = environ.get(env, "").lower()
        if raw not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"{env} must be true or false, not {raw!r}")
        return raw in ("1", "true", "yes")

    def number(flag: str, env: str, default: int) -> int:
        raw = value(flag, env)
        if raw is None:
            return default
        if not raw.isdigit() or int(raw) < 1:
            also = " or auto" if flag == "--processes" else ""
            raise ConfigError(f"{flag} / {env} must be a positive whole number{also}, not {raw!r}")
        return int(raw)

    def path(flag: str, env: str) -> Path | None:
        raw = value(flag, env)
        return Path(raw) if raw else None

    dev = switch("--dev", "KMS_DEV")
    data_dir = path("--data-dir", "KMS_DATA_DIR")
    database_url = value("--database-url", "KMS_DATABASE_URL")
    if data_dir is None and (dev or not database_url):
        raise ConfigError("--data-dir / KMS_DATA_DIR is required (or give --database-url)")
    data_dir = data_dir or Path(".")
    if not database_url:
        database_url = f"sqlite+pysqlite:///{(data_dir / 'kms.sqlite3').resolve()}"
    tls_cert, tls_key = path("--tls-cert", "KMS_TLS_CERT"), path("--tls-key", "KMS_TLS_KEY")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    processes_text = value("--processes", "KMS_PROCESSES")
    processes = (
        os.cpu_count() or 1
        if processes_text == "auto"
        else number("--processes", "KMS_PROCESSES", 1)
    )
    index_text = environ.get("KMS_PROCESS_INDEX")
    settings = ServerSettings(
        listen=value("--listen", "KMS_LISTEN") or DEFAULT_LISTEN,
        data_dir=data_dir,
        database_url=database_url,
        root_key_file=path("--root-key-file", "KMS_ROOT_KEY_FILE") or data_dir / "root.key",
        policy_file=path("--policy-file", "KMS_POLICY_FILE") or data_dir / "policy.toml",
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=path("--tls-client-ca", "KMS_TLS_CLIENT_CA"),
        insecure=switch("--insecure", "KMS_INSECURE") or dev,
        dev=dev,
        max_workers=number("--max-workers", "KMS_MAX_WORKERS", 16),
        db_pool_size=number("--db-pool-size", "KMS_DB_POOL_SIZE", 10),
        ready_file=path("--ready-file", "KMS_READY_FILE"),
        log_level=(value("--log-level", "KMS_LOG_LEVEL") or "INFO").upper(),
        health_listen=value("--health-listen", "KMS_HEALTH_LISTEN"),
        max_concurrent_rpcs=number("--max-concurrent-rpcs", "KMS_MAX_CONCURRENT_RPCS", 256),
        db_statement_timeout_ms=number(
            "--db-statement-timeout-ms", "KMS_DB_STATEMENT_TIMEOUT_MS", 5000
        ),
        shutdown_grace_seconds=number("--shutdown-grace-seconds", "KMS_SHUTDOWN_GRACE_SECONDS", 10),
        metrics_listen=value("--metrics-listen", "KMS_METRICS_LISTEN"),
        log_format=(value("--log-format", "KMS_LOG_FORMAT") or "json").lower(),
        processes=processes,
        process_index=int(index_text) if index_text and index_text.isdigit() else None,
        audit_file=path("--audit-file", "KMS_AUDIT_FILE"),
        material_cache_seconds=_cache_seconds(
            value("--material-cache-seconds", "KMS_MATERIAL_CACHE_SECONDS")
        ),
        root_key=value("--root-key", "KMS_ROOT_KEY") or None,
        previous_root_keys=tuple(
            getattr(args, "previous_root_key_file", None)
            or filter(None, environ.get("KMS_PREVIOUS_ROOT_KEY_FILES", "").split(","))
        ),
        pkcs11_module=path("--pkcs11-module", "KMS_PKCS11_MODULE"),
        pkcs11_pin_file=path("--pkcs11-pin-file", "KMS_PKCS11_PIN_FILE"),
        pkcs11_pin=environ.get("KMS_PKCS11_PIN") or None,
    )
    if settings.log_format not in ("json", "text"):
        raise ConfigError("--log-format / KMS_LOG_FORMAT must be json or text")
    if settings.metrics_listen:
        _, sep, port = settings.metrics_listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(
                f"--metrics-listen / KMS_METRICS_LISTEN must be host:port, not "
                f"{settings.metrics_listen!r}"
            )
    if settings.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("--log-level / KMS_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
    check_transport(settings)
    return settings


def _cache_seconds(raw: str | None) -> int:
    if raw is None:
        return 60
    if not raw.isascii() or not raw.isdigit() or int(raw) > 60:
        raise ConfigError(
            "--material-cache-seconds / KMS_MATERIAL_CACHE_SECONDS must be a whole number "
            f"from 0 to 60, not {raw!r}"
        )
    return int(raw)


def listen_host(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--listen / KMS_LISTEN must be host:port, not {listen!r}")
    return host.strip("[]")


def check_transport(settings: ServerSettings) -> None:
    """Plaintext only when asked for, and only on a loopback address."""
    if settings.health_listen and not _is_loopback(listen_host(settings.health_listen)):
        raise ConfigError(
            "--health-listen / KMS_HEALTH_LISTEN is plaintext, so it must be a loopback address"
        )
    if settings.tls_client_ca is not None and not settings.uses_tls:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    if settings.uses_tls:
        return
    host = listen_host(settings.listen)
    if not settings.insecure:
        raise ConfigError(
            "refusing to serve without TLS: give --tls-cert and --tls-key, or --insecure "
            "to allow plaintext on a loopback address"
        )
    if not _is_loopback(host):
        raise ConfigError(
            f"refusing plaintext on {host}: without TLS the server listens only on a "
            "loopback address (127.0.0.1, ::1 or localhost)"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> ServerSettings:
    parser = argparse.ArgumentParser(prog="kms-server")
    add_arguments(parser)
    return load(parser.parse_args(argv), os.environ if environ is None else environ)
