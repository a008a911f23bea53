"""`kms-server`: serve; `kms-server migrate` upgrades the database schema, `kms-server
rewrap-root-keys` moves every blob to the current root key, `kms-server init` makes a
production data directory."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from server import config, devmode, init_data_dir, root_rotation, workers
from server.api.observability import (
    CallLog,
    CallQueueHandler,
    JsonCallLog,
    JsonFormatter,
    LogWriter,
)
from server.app import StartupError, create_server, open_database
from server.keystore.crypto import RootKeyError
from server.policy import PolicyError
from server.signals import ServerSignals

log = logging.getLogger("kms-server")


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
SUBCOMMANDS = ("migrate", "rewrap-root-keys", "init", "completion")


def build_parser(
    command: str = "serve", *, with_subcommands: bool = False
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kms-server" if command == "serve" else f"kms-server {command}",
        description="The kms.v1 key-management server (docs/configuration.md). "
        "`kms-server migrate` upgrades the database schema and exits; "
        "`kms-server rewrap-root-keys` rewraps every blob under the current root key; "
        "`kms-server init --data-dir DIR` makes a data directory; "
        "`kms-server completion bash|zsh` prints a shell completion script.",
    )
    parser.add_argument("--version", action="version", version=_version())
    config.add_arguments(parser)
    if command == "rewrap-root-keys":
        _rewrap_arguments(parser)
    if with_subcommands:
        # Only for completion: main() dispatches the subcommands before parsing.
        commands = parser.add_subparsers(
            dest="subcommand", metavar="[migrate|rewrap-root-keys|init|completion]"
        )
        config.add_arguments(commands.add_parser("migrate", help="upgrade the database schema"))
        rewrap = commands.add_parser("rewrap-root-keys", help="rewrap under the current root key")
        config.add_arguments(rewrap)
        _rewrap_arguments(rewrap)
        commands.add_parser("init", help="make a production data directory")
        commands.add_parser("completion", help="print a shell completion script")
    return parser


MAX_REWRAP_BATCH = 10_000


def _rewrap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=100,
        help=f"key versions per batch, 1 to {MAX_REWRAP_BATCH} (default 100)",
    )


def _batch_size(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_REWRAP_BATCH:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_REWRAP_BATCH}")
    return int(text)


def _version() -> str:
    from importlib import metadata

    try:
        return f"kms-server (backup-kms) {metadata.version('backup-kms')}"
    except metadata.PackageNotFoundError:
        return "kms-server (backup-kms) unknown"


def main(argv: Sequence[str] | None = None) -> int:
    # Everything the server writes (the SQLite file and its -wal/-shm, dev-mode files, ready
    # files) is the owner's alone, from the first moment, in every command.
    os.umask(0o077)
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args[:1] and args[0] in SUBCOMMANDS else "serve"
    if command != "serve":
        args = args[1:]
    settings: config.ServerSettings | None = None
    try:
        if command == "completion":
            return _completion(args)
        if command == "init":
            return init_data_dir.main(args)
        parsed = build_parser(command).parse_args(args)
        if command != "serve":
            # Migrating or rewrapping serves nothing: the listening and TLS checks do not apply.
            parsed.insecure, parsed.listen = True, "127.0.0.1:0"
        settings = config.load(parsed, os.environ)
        if command == "migrate":
            config.check_files(settings, migrating=True)
            _configure_logging(settings)
            _protect_sqlite_files(settings)
            open_database(settings, upgrade=True).dispose()
            _protect_sqlite_files(settings)
            print("the database schema is up to date")
            return EXIT_OK
        if command == "rewrap-root-keys":
            _configure_logging(settings)
            return root_rotation.run(settings, parsed.batch_size)
        call_lines = _configure_logging(settings)
        return _serve(settings, args, call_lines)
    except (config.ConfigError, StartupError, RootKeyError, PolicyError) as error:
        for line in str(error).splitlines():
            print(f"kms-server: {line}", file=sys.stderr)
        return EXIT_USAGE
    except SQLAlchemyError as error:
        url = settings.database_url if settings is not None else ""
        print(f"kms-server: {_database_problem(error, url)}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"kms-server: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("kms-server: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # the last line of defence: one line, never a traceback
        print(
            f"kms-server: unexpected internal error ({type(error).__name__}); please report "
            "it as a bug, with the command you ran",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def _completion(args: list[str]) -> int:
    from client.completion import SHELLS, completion_script

    if len(args) != 1 or args[0] not in SHELLS:
        print("usage: kms-server completion {bash,zsh}", file=sys.stderr)
        print("kms-server: error: completion: give one shell, bash or zsh", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(completion_script("kms-server", build_parser(with_subcommands=True), args[0]))
    return EXIT_OK


def _database_problem(error: SQLAlchemyError, database_url: str) -> str:
    """One line: the driver's first line of why, never the password."""
    cause = getattr(error, "orig", None) or error
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    password = make_url(database_url).password if database_url else None
    if password:
        first = first.replace(str(password), "***")
    return f"cannot use the database (--database-url / KMS_DATABASE_URL): {first}"


def _protect_sqlite_files(settings: config.ServerSettings) -> None:
    """The SQLite file holds wrapped key material: 0600, and so its -wal and -shm (SQLite
    gives them the database file's mode). Fixes files an older release left 0644."""
    if not settings.database_url.startswith("sqlite"):
        return
    database = make_url(settings.database_url).database
    if not database:
        return
    for suffix in ("", "-wal", "-shm", "-journal", ".writers"):
        path = Path(database + suffix)
        with contextlib.suppress(FileNotFoundError):
            if path.is_file() and path.stat().st_uid == os.getuid():
                os.chmod(path, 0o600)


def _serve(settings: config.ServerSettings, argv: Sequence[str], call_lines: CallLog | None) -> int:
    supervised = settings.process_index is not None
    if settings.dev and not supervised:
        if settings.data_dir.exists() and not settings.data_dir.is_dir():
            raise config.ConfigError(
                f"--data-dir / KMS_DATA_DIR {settings.data_dir} is not a directory"
            )
        token_files = devmode.bootstrap(settings)
        print(f"dev mode: data directory {settings.data_dir}", flush=True)
        print(f"dev mode: root key {settings.root_key or settings.root_key_file}", flush=True)
        for path in token_files:
            print(f"dev mode: {path.name} token in {path}", flush=True)
    config.check_files(settings)
    _protect_sqlite_files(settings)
    if settings.processes > 1 and not supervised:
        return workers.supervise(settings, argv)
    running = create_server(
        settings, upgrade_schema=settings.upgrades_own_schema, call_lines=call_lines
    )
    settle_garbage_collector()
    address = settings.address(running.port)
    log.info("serving kms.v1 on %s (%s)", address, "TLS" if settings.uses_tls else "plaintext")
    if not supervised:  # the supervisor says it once, for all its processes
        print(f"kms-server listening on {address}", flush=True)
    if running.metrics_port is not None:
        log.info("serving Prometheus metrics on port %d", running.metrics_port)
    if settings.ready_file:
        workers.write_atomically(settings.ready_file, address)
    supervisor = os.getppid()

    # Signal handlers only set flags; the main thread does the work.
    signals = ServerSignals("shutting down").install()
    wake, stopping, reloading = signals.wake, signals.stopping, signals.reloading
    while not stopping.is_set():
        wake.wait(timeout=1.0 if supervised else None)
        wake.clear()
        if supervised and os.getppid() != supervisor:
            log.error("the supervising kms-server process is gone; stopping")
            break
        if reloading.is_set() and not stopping.is_set():
            reloading.clear()
            log.info("received SIGHUP, reloading the policy and certificates")
            running.reload()
    running.stop(settings.shutdown_grace_seconds)
    log.info("stopped")
    return 0


# Objects allocated (less those freed) between young-generation collections; the default,
# 700, is reached every few calls under load.
GC_YOUNG_THRESHOLD = 100_000


def settle_garbage_collector() -> None:
    """Once start-up is done: what it made (modules, the policy, the engine, grpc's objects)
    is kept out of every later collection, and the youngest generation is collected less
    often. Cycles are still collected; a collection just has fewer objects to look at."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _configure_logging(settings: config.ServerSettings) -> CallLog | None:
    """Logging to stderr through one writer thread; returns where call lines go (None: the
    `kms.call` logger, as for every other record)."""
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Request threads only enqueue records; one thread formats and writes them, so calls
    # never wait on the stream's lock or its write.
    writer = LogWriter(handler)
    writer.start()
    atexit.register(writer.stop)  # writes what is still queued before the process ends
    logging.basicConfig(level=settings.log_level, handlers=[CallQueueHandler(writer.records)])
    # JSON call lines are built directly, as JsonFormatter would write them (the cheap way).
    return JsonCallLog(writer) if settings.log_format == "json" else None


if __name__ == "__main__":
    sys.exit(main())
