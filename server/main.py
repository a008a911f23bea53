"""`kms-server`: serve, or `kms-server migrate` to upgrade the database schema."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Sequence

from server import config, devmode, init_data_dir, root_rotation, workers
from server.api.observability import (
    CallLog,
    CallQueueHandler,
    JsonCallLog,
    JsonFormatter,
    LogWriter,
)
from server.app import StartupError, create_server, open_database
from server.crypto import RootKeyError
from server.policy import PolicyError
from server.signals import ServerSignals

log = logging.getLogger("kms-server")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["init"]:
        return init_data_dir.main(args[1:])
    command = args[0] if args[:1] in (["migrate"], ["rewrap-root-keys"]) else "serve"
    if command != "serve":
        args = args[1:]
    parser = argparse.ArgumentParser(
        prog="kms-server" if command == "serve" else f"kms-server {command}",
        description="The kms.v1 key-management server. `kms-server migrate` upgrades the "
        "database schema and exits; `kms-server rewrap-root-keys` rewraps every blob under the "
        "current root key; `kms-server init --data-dir DIR` makes a data directory.",
    )
    config.add_arguments(parser)
    if command == "rewrap-root-keys":
        parser.add_argument("--batch-size", type=int, default=100, help="key versions per batch")
    try:
        parsed = parser.parse_args(args)
        if command != "serve":
            # Migrating serves nothing, so the listening and TLS checks do not apply.
            parsed.insecure, parsed.listen = True, "127.0.0.1:0"
        settings = config.load(parsed, os.environ)
        call_lines = _configure_logging(settings)
        if command == "migrate":
            open_database(settings, upgrade=True).dispose()
            print("the database schema is up to date")
            return 0
        if command == "rewrap-root-keys":
            return root_rotation.run(settings, max(1, parsed.batch_size))
        return _serve(settings, args, call_lines)
    except (config.ConfigError, StartupError, RootKeyError, PolicyError) as error:
        print(f"kms-server: {error}", file=sys.stderr)
        return 2


def _serve(settings: config.ServerSettings, argv: Sequence[str], call_lines: CallLog | None) -> int:
    # The SQLite file, its journal and dev-mode files hold wrapped key material: owner only.
    os.umask(0o077)
    supervised = settings.process_index is not None
    if settings.dev and not supervised:
        token_files = devmode.bootstrap(settings)
        print(f"dev mode: data directory {settings.data_dir}", flush=True)
        print(f"dev mode: root key {settings.root_key or settings.root_key_file}", flush=True)
        for path in token_files:
            print(f"dev mode: {path.name} token in {path}", flush=True)
    if settings.processes > 1 and not supervised:
        return workers.supervise(settings, argv)
    running = create_server(
        settings, upgrade_schema=settings.upgrades_own_schema, call_lines=call_lines
    )
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
