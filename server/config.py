"""Server settings: a frozen dataclass loaded from flags and `KMS_*` environment variables.

Flags win over the environment. Nothing happens at import time; loading only
parses and checks, and names the setting when something is wrong.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.domain import model

DEFAULT_LISTEN = "127.0.0.1:50051"


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


DEFAULT_DESTROY_DELAY_SECONDS = 7 * 86400
MIN_DESTROY_DELAY_SECONDS = 86400  # outside dev mode
_DURATION = re.compile(r"(\d{1,9})([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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
    metrics_allow_remote: bool = False
    log_format: str = "json"
    db_statement_timeout_ms: int = 5000
    shutdown_grace_seconds: int = 10
    processes: int = 1
    # Set (internally) in each process a `--processes` supervisor starts.
    process_index: int | None = None
    audit_file: Path | None = None
    material_cache_seconds: int = 60
    data_key_retry_window_seconds: int = 900
    auth_failure_burst: int = 10
    auth_failures_per_minute: int = 60
    auth_failure_summary_seconds: int = 60
    public_max_concurrent_rpcs: int = 64
    public_max_rpcs_per_connection: int = 4
    # The waiting period of DestroyKeyVersion (server.usecases.lifecycle).
    destroy_delay_seconds: int = DEFAULT_DESTROY_DELAY_SECONDS
    # Rotation by use (server.usecases.auto_rotation).
    max_data_keys_per_version: int = model.DEFAULT_MAX_DATA_KEYS_PER_VERSION
    # Root keys beyond --root-key-file (server.keystore.root_keys): a file path or a pkcs11:
    # URI each.
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
        "host:port serving Prometheus metrics over plain HTTP, loopback unless "
        "--metrics-allow-remote (default: off)",
    ),
    ("--log-format", "KMS_LOG_FORMAT", "json (one object per line, the default) or text"),
    (
        "--audit-file",
        "KMS_AUDIT_FILE",
        "also append every audit event to this file as a JSON line, fsynced before the reply; "
        "calls fail closed when it cannot be written; SIGHUP reopens it (default: off)",
    ),
    (
        "--destroy-delay",
        "KMS_DESTROY_DELAY",
        "how long a destroyed key version waits, cancellable, before it is crypto-shredded: "
        "30s, 15m, 24h, 7d; at least 24h unless --dev (default 7d)",
    ),
    (
        "--max-data-keys-per-version",
        "KMS_MAX_DATA_KEYS_PER_VERSION",
        "how many data keys one key version may wrap; the key is rotated before its active "
        f"version reaches it, {model.MIN_DATA_KEYS_PER_VERSION} to 2^31 "
        "(default 2^30 = 1073741824)",
    ),
    (
        "--material-cache-seconds",
        "KMS_MATERIAL_CACHE_SECONDS",
        "how long unwrapped version material may stay in memory, 0 to 60 (default 60)",
    ),
    (
        "--data-key-retry-window",
        "KMS_DATA_KEY_RETRY_WINDOW",
        "seconds during which the principal that got a backup's data key may get it again "
        "(a retry); after that, and for anyone else, BACKUP_ID_IN_USE (default 900)",
    ),
    (
        "--auth-failure-burst",
        "KMS_AUTH_FAILURE_BURST",
        "calls failing authentication one peer address may make at once before it is "
        "rate-limited (default 10)",
    ),
    (
        "--auth-failures-per-minute",
        "KMS_AUTH_FAILURES_PER_MINUTE",
        "calls failing authentication one peer address may make per minute (default 60)",
    ),
    (
        "--auth-failure-summary-seconds",
        "KMS_AUTH_FAILURE_SUMMARY_SECONDS",
        "rate-limited calls are audited as one summary event per peer per this many "
        "seconds (default 60)",
    ),
    (
        "--public-max-concurrent-rpcs",
        "KMS_PUBLIC_MAX_CONCURRENT_RPCS",
        "health and reflection calls and streams in progress at once, apart from "
        "--max-concurrent-rpcs (default 64)",
    ),
    (
        "--public-max-rpcs-per-connection",
        "KMS_PUBLIC_MAX_RPCS_PER_CONNECTION",
        "health and reflection calls and streams in progress on one connection (default 4)",
    ),
]
_FLAGS = [
    ("--insecure", "KMS_INSECURE", "allow plaintext on a loopback address"),
    ("--dev", "KMS_DEV", "first-run mode: create a root key, policy and tokens"),
    (
        "--metrics-allow-remote",
        "KMS_METRICS_ALLOW_REMOTE",
        "allow --metrics-listen on a non-loopback address (plain HTTP, names every key)",
    ),
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


MAX_PROCESSES_PER_CPU = 4
MAX_WORKERS = 1024
MAX_POOL_SIZE = 1000
MAX_CONCURRENT_RPCS = 100_000
MAX_STATEMENT_TIMEOUT_MS = 3_600_000
MAX_SHUTDOWN_GRACE_SECONDS = 3600
# Drivers the server is built and tested with (server/db/engine.py).
SUPPORTED_DATABASE_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql", "postgresql+psycopg")
# Far above any real root key file (32 bytes), policy or PEM bundle: /dev/zero is not read.
MAX_ROOT_KEY_FILE_BYTES = 4096
MAX_SETTING_FILE_BYTES = 1 << 20
MAX_MATERIAL_CACHE_SECONDS = 60  # the bound issue 13 promises for every replica
MAX_RETRY_WINDOW_SECONDS = 24 * 3600
MAX_AUTH_FAILURE_RATE = 100_000
MAX_SUMMARY_SECONDS = 24 * 3600


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerSettings:
    """Every setting is checked; all problems are reported together, one line each."""
    problems: list[str] = []

    def value(flag: str, env: str) -> str | None:
        given = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        raw = given if given is not None else environ.get(env)
        if raw is None:
            return None
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(f"{flag} / {env} is not valid UTF-8")
            return None
        return raw

    def switch(flag: str, env: str) -> bool:
        given = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if given:
            return True
        raw = environ.get(env, "").lower()
        if raw not in ("", "0", "1", "true", "false", "yes", "no"):
            problems.append(f"{env} must be true or false, not {raw!r}")
            return False
        return raw in ("1", "true", "yes")

    def number(flag: str, env: str, default: int, maximum: int, minimum: int = 1) -> int:
        raw = value(flag, env)
        if raw is None:
            return default
        # ASCII digits only: str.isdigit() also takes "٣" and "²".
        if not (raw.isascii() and raw.isdigit()) or not minimum <= int(raw) <= maximum:
            also = " or auto" if flag == "--processes" else ""
            problems.append(
                f"{flag} / {env} must be a whole number from {minimum} to {maximum}{also}, "
                f"not {raw!r}"
            )
            return default
        return int(raw)

    def path(flag: str, env: str) -> Path | None:
        raw = value(flag, env)
        return Path(raw) if raw else None

    def address(flag: str, env: str) -> str | None:
        raw = value(flag, env)
        if raw is None or raw == "":
            return None
        try:
            listen_host(raw, f"{flag} / {env}")
        except ConfigError as error:
            problems.append(str(error))
            return None
        return raw

    dev = switch("--dev", "KMS_DEV")
    data_dir = path("--data-dir", "KMS_DATA_DIR")
    database_url = value("--database-url", "KMS_DATABASE_URL")
    if data_dir is None and (dev or not database_url):
        problems.append("--data-dir / KMS_DATA_DIR is required (or give --database-url)")
    data_dir = data_dir or Path(".")
    if database_url:
        problem = database_url_problem(database_url)
        if problem:
            problems.append(problem)
    else:
        database_url = f"sqlite+pysqlite:///{(data_dir / 'kms.sqlite3').resolve()}"
    tls_cert, tls_key = path("--tls-cert", "KMS_TLS_CERT"), path("--tls-key", "KMS_TLS_KEY")
    if (tls_cert is None) != (tls_key is None):
        problems.append("--tls-cert and --tls-key go together")
    cpus = os.cpu_count() or 1
    max_processes = MAX_PROCESSES_PER_CPU * cpus
    processes_text = value("--processes", "KMS_PROCESSES")
    processes = (
        cpus
        if processes_text == "auto"
        else number("--processes", "KMS_PROCESSES", 1, max_processes)
    )
    index_text = environ.get("KMS_PROCESS_INDEX")
    log_level = (value("--log-level", "KMS_LOG_LEVEL") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append("--log-level / KMS_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
    log_format = (value("--log-format", "KMS_LOG_FORMAT") or "json").lower()
    if log_format not in ("json", "text"):
        problems.append("--log-format / KMS_LOG_FORMAT must be json or text")
    listen = address("--listen", "KMS_LISTEN") or DEFAULT_LISTEN
    metrics_listen = address("--metrics-listen", "KMS_METRICS_LISTEN")
    metrics_allow_remote = switch("--metrics-allow-remote", "KMS_METRICS_ALLOW_REMOTE")
    if (
        metrics_listen
        and not metrics_allow_remote
        and not _is_loopback(listen_host(metrics_listen))
    ):
        problems.append(
            f"--metrics-listen / KMS_METRICS_LISTEN {metrics_listen!r} is not a loopback "
            "address: the metrics are plain HTTP without authentication and name every key; "
            "give --metrics-allow-remote to serve them beyond this machine"
        )
    try:
        destroy_delay_seconds = _destroy_delay(value("--destroy-delay", "KMS_DESTROY_DELAY"), dev)
    except ConfigError as error:
        problems.append(str(error))
        destroy_delay_seconds = DEFAULT_DESTROY_DELAY_SECONDS
    cache_text = value("--material-cache-seconds", "KMS_MATERIAL_CACHE_SECONDS")
    material_cache_seconds = MAX_MATERIAL_CACHE_SECONDS
    if cache_text is not None:
        if cache_text.isascii() and cache_text.isdigit() and int(cache_text) <= 60:
            material_cache_seconds = int(cache_text)
        else:
            problems.append(
                "--material-cache-seconds / KMS_MATERIAL_CACHE_SECONDS must be a whole number "
                f"from 0 to {MAX_MATERIAL_CACHE_SECONDS}, not {cache_text!r}"
            )
    settings = ServerSettings(
        listen=listen,
        data_dir=data_dir,
        database_url=database_url,
        root_key_file=path("--root-key-file", "KMS_ROOT_KEY_FILE") or data_dir / "root.key",
        policy_file=path("--policy-file", "KMS_POLICY_FILE") or data_dir / "policy.toml",
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=path("--tls-client-ca", "KMS_TLS_CLIENT_CA"),
        insecure=switch("--insecure", "KMS_INSECURE") or dev,
        dev=dev,
        max_workers=number("--max-workers", "KMS_MAX_WORKERS", 16, MAX_WORKERS),
        db_pool_size=number("--db-pool-size", "KMS_DB_POOL_SIZE", 10, MAX_POOL_SIZE),
        ready_file=path("--ready-file", "KMS_READY_FILE"),
        log_level=log_level,
        health_listen=address("--health-listen", "KMS_HEALTH_LISTEN"),
        max_concurrent_rpcs=number(
            "--max-concurrent-rpcs", "KMS_MAX_CONCURRENT_RPCS", 256, MAX_CONCURRENT_RPCS
        ),
        db_statement_timeout_ms=number(
            "--db-statement-timeout-ms",
            "KMS_DB_STATEMENT_TIMEOUT_MS",
            5000,
            MAX_STATEMENT_TIMEOUT_MS,
        ),
        shutdown_grace_seconds=number(
            "--shutdown-grace-seconds",
            "KMS_SHUTDOWN_GRACE_SECONDS",
            10,
            MAX_SHUTDOWN_GRACE_SECONDS,
        ),
        metrics_listen=metrics_listen,
        metrics_allow_remote=metrics_allow_remote,
        log_format=log_format,
        processes=processes,
        process_index=int(index_text) if index_text and index_text.isdigit() else None,
        audit_file=path("--audit-file", "KMS_AUDIT_FILE"),
        material_cache_seconds=material_cache_seconds,
        data_key_retry_window_seconds=number(
            "--data-key-retry-window", "KMS_DATA_KEY_RETRY_WINDOW", 900, MAX_RETRY_WINDOW_SECONDS
        ),
        auth_failure_burst=number(
            "--auth-failure-burst", "KMS_AUTH_FAILURE_BURST", 10, MAX_AUTH_FAILURE_RATE
        ),
        auth_failures_per_minute=number(
            "--auth-failures-per-minute", "KMS_AUTH_FAILURES_PER_MINUTE", 60, MAX_AUTH_FAILURE_RATE
        ),
        auth_failure_summary_seconds=number(
            "--auth-failure-summary-seconds",
            "KMS_AUTH_FAILURE_SUMMARY_SECONDS",
            60,
            MAX_SUMMARY_SECONDS,
        ),
        public_max_concurrent_rpcs=number(
            "--public-max-concurrent-rpcs",
            "KMS_PUBLIC_MAX_CONCURRENT_RPCS",
            64,
            MAX_CONCURRENT_RPCS,
        ),
        public_max_rpcs_per_connection=number(
            "--public-max-rpcs-per-connection",
            "KMS_PUBLIC_MAX_RPCS_PER_CONNECTION",
            4,
            MAX_CONCURRENT_RPCS,
        ),
        destroy_delay_seconds=destroy_delay_seconds,
        max_data_keys_per_version=number(
            "--max-data-keys-per-version",
            "KMS_MAX_DATA_KEYS_PER_VERSION",
            model.DEFAULT_MAX_DATA_KEYS_PER_VERSION,
            model.MAX_DATA_KEYS_PER_VERSION,
            model.MIN_DATA_KEYS_PER_VERSION,
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
    if not problems:
        try:
            check_transport(settings)
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("\n".join(problems))
    return settings


def database_url_problem(url: str) -> str | None:
    """Why `url` cannot be used, in one line, or None. The password is never repeated."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return (
            "--database-url / KMS_DATABASE_URL is not a database URL; give "
            "postgresql://USER@HOST:PORT/DATABASE or sqlite:////path/to/kms.sqlite3"
        )
    if parsed.drivername not in SUPPORTED_DATABASE_DRIVERS:
        return (
            f"--database-url / KMS_DATABASE_URL uses {parsed.drivername}://, which this server "
            "does not support; use postgresql:// (psycopg 3) or sqlite://"
        )
    if parsed.get_backend_name() == "sqlite" and not parsed.database:
        return "--database-url / KMS_DATABASE_URL names no SQLite file (sqlite:////path/to/file)"
    return None


def check_files(settings: ServerSettings, *, migrating: bool = False) -> None:
    """The directories and files the settings name exist and are what they should be.

    Run at start, after dev mode created what it creates; not in `load`, which only parses.
    """
    problems: list[str] = []
    embedded = settings.database_url.startswith("sqlite")
    if embedded or settings.dev or not migrating:
        directory = settings.data_dir
        if directory.exists() and not directory.is_dir():
            problems.append(f"--data-dir / KMS_DATA_DIR {directory} is not a directory")
        elif not directory.exists() and (embedded or settings.dev):
            problems.append(
                f"--data-dir / KMS_DATA_DIR {directory} does not exist; create it "
                f"(mkdir -m 700 {directory}) or start once with --dev"
            )
    if not migrating:
        # --root-key (a pkcs11: URI or a file) replaces --root-key-file: server.keystore.root_keys
        # checks it.
        root_key_file = settings.root_key_file if settings.root_key is None else None
        files = [
            (
                "--root-key-file / KMS_ROOT_KEY_FILE",
                root_key_file,
                MAX_ROOT_KEY_FILE_BYTES,
            ),
            ("--policy-file / KMS_POLICY_FILE", settings.policy_file, MAX_SETTING_FILE_BYTES),
            ("--tls-cert / KMS_TLS_CERT", settings.tls_cert, MAX_SETTING_FILE_BYTES),
            ("--tls-key / KMS_TLS_KEY", settings.tls_key, MAX_SETTING_FILE_BYTES),
            ("--tls-client-ca / KMS_TLS_CLIENT_CA", settings.tls_client_ca, MAX_SETTING_FILE_BYTES),
        ]
        for name, file, limit in files:
            if file is not None:
                problem = regular_file_problem(file, limit)
                if problem:
                    problems.append(f"{name} {file} {problem}")
    if problems:
        raise ConfigError("\n".join(problems))


def regular_file_problem(path: Path, limit: int) -> str | None:
    try:
        info = path.stat()
    except OSError as error:
        return f"cannot be read: {error.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_size > limit:
        return f"is larger than {limit} bytes"
    if not os.access(path, os.R_OK):
        return "cannot be read: permission denied"
    return None


def parse_duration(raw: str) -> int:
    """Seconds in a duration such as 30s, 15m, 24h or 7d; ConfigError otherwise."""
    match = _DURATION.fullmatch(raw.strip())
    if match is None:
        raise ConfigError(f"{raw!r} is not a duration such as 30s, 15m, 24h or 7d")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _destroy_delay(raw: str | None, dev: bool) -> int:
    if raw is None:
        return DEFAULT_DESTROY_DELAY_SECONDS
    try:
        seconds = parse_duration(raw)
    except ConfigError as error:
        raise ConfigError(f"--destroy-delay / KMS_DESTROY_DELAY: {error}") from None
    if seconds < MIN_DESTROY_DELAY_SECONDS and not dev:
        raise ConfigError(
            "--destroy-delay / KMS_DESTROY_DELAY must be at least 24h (shorter only with --dev), "
            f"not {raw!r}"
        )
    return seconds


def listen_host(listen: str, name: str = "--listen / KMS_LISTEN") -> str:
    """The host of host:port; the port must be 0 (pick one) to 65535."""
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(
            f"{name} must be host:port with a port from 0 to 65535 (0 picks one), not {listen!r}"
        )
    return host.strip("[]")


def listen_port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


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
