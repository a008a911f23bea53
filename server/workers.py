"""`--processes N`: several kms-server processes accepting on one port (SO_REUSEPORT).

One Python process serves on one core at a time (the GIL). With N processes the
kernel spreads new connections over them, like replicas behind a load balancer:
each process is a whole, stateless kms-server, and the database serializes what
must be serialized (the audit chain, rotations) exactly as it does for replicas.

This supervisor does the once-only start-up (dev-mode files, the schema, the root-key
check) so the processes never race on it, reserves the port, starts the processes
and waits until every one serves. Then it forwards SIGHUP, stops them all on SIGTERM,
and if one dies it stops the rest and exits non-zero: the service manager restarts
the whole server, as it would a single process.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import Engine

from server import config
from server.api.observability import ActiveVersionCollector
from server.app import StartupError, active_versions, open_database, refuse_port_in_use
from server.keystore.root_keys import load_keyring
from server.service import KeyManagementService
from server.signals import ServerSignals

log = logging.getLogger("kms-server")

# Set in each process's environment: its index, which also marks it as supervised.
PROCESS_INDEX_VARIABLE = "KMS_PROCESS_INDEX"
READY_TIMEOUT_SECONDS = 60.0


def supervise(settings: config.ServerSettings, argv: Sequence[str]) -> int:
    """Runs `settings.processes` kms-server processes until SIGTERM; returns the exit status."""
    engine = open_database(settings, upgrade=settings.upgrades_own_schema)
    try:
        service = KeyManagementService(engine, load_keyring(settings))
        try:
            service.check_root_key()  # once, before the processes could race to record it
        finally:
            service.close()
        if settings.health_listen and config.listen_port(settings.health_listen) != 0:
            refuse_port_in_use(
                config.listen_host(settings.health_listen),
                config.listen_port(settings.health_listen),
                settings.health_listen,
            )
        port_holders = _reserve_port(settings.listen)
        try:
            address = settings.address(port_holders[0].getsockname()[1])
            with tempfile.TemporaryDirectory(prefix="kms-processes-") as scratch:
                return _run(settings, argv, address, Path(scratch), engine)
        finally:
            for holder in port_holders:
                holder.close()
    finally:
        engine.dispose()


def _run(
    settings: config.ServerSettings,
    argv: Sequence[str],
    address: str,
    scratch: Path,
    engine: Engine,
) -> int:
    metrics_dir = scratch / "metrics"
    metrics_dir.mkdir()
    processes = [
        _start(settings, argv, index, address, scratch, metrics_dir)
        for index in range(settings.processes)
    ]
    signals = ServerSignals(f"stopping {len(processes)} processes").install()
    wake, stopping, reloading = signals.wake, signals.stopping, signals.reloading
    status = 0
    try:
        _wait_until_ready(processes, scratch, stopping)
        if stopping.is_set():
            return 0
        metrics_port = _serve_metrics(settings, metrics_dir, engine)
        log.info("serving kms.v1 on %s with %d processes", address, len(processes))
        print(f"kms-server listening on {address}", flush=True)
        if metrics_port is not None:
            log.info("serving Prometheus metrics on port %d", metrics_port)
        if settings.ready_file:
            write_atomically(settings.ready_file, address)
        while not stopping.is_set():
            wake.wait(timeout=0.5)
            wake.clear()
            if reloading.is_set():
                reloading.clear()
                log.info("received SIGHUP, reloading every process")
                for process in processes:
                    process.send_signal(signal.SIGHUP)
            dead = [p for p in processes if p.poll() is not None]
            if dead and not stopping.is_set():
                log.error(
                    "kms-server process %d exited with status %s; stopping the others",
                    dead[0].pid,
                    dead[0].returncode,
                )
                status = 1
                break
    except StartupError as error:
        print(f"kms-server: {error}", file=sys.stderr)
        status = 2
    finally:
        _stop_all(processes, settings.shutdown_grace_seconds)
    log.info("stopped")
    return status


def _start(
    settings: config.ServerSettings,
    argv: Sequence[str],
    index: int,
    address: str,
    scratch: Path,
    metrics_dir: Path,
) -> subprocess.Popen[bytes]:
    environment = {**os.environ, PROCESS_INDEX_VARIABLE: str(index)}
    if settings.metrics_listen:
        # Each process records into files here; the supervisor serves their sum.
        environment["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # Later flags win: the same settings, one process, the reserved port, its own ready file.
    command = [
        sys.executable,
        "-m",
        "server.main",
        *argv,
        "--processes",
        "1",
        "--listen",
        address,
        "--ready-file",
        str(scratch / f"ready-{index}"),
    ]
    return subprocess.Popen(command, env=environment)


def _wait_until_ready(
    processes: Sequence[subprocess.Popen[bytes]], scratch: Path, stopping: threading.Event
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not stopping.is_set():
        for process in processes:
            if process.poll() is not None:
                raise StartupError(f"a kms-server process exited at start ({process.returncode})")
        if all((scratch / f"ready-{index}").exists() for index in range(len(processes))):
            return
        if time.monotonic() > deadline:
            raise StartupError(f"the processes did not start within {READY_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.05)


def _stop_all(processes: Sequence[subprocess.Popen[bytes]], grace_seconds: int) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    # Each process drains its own calls within the grace period; then it is killed.
    deadline = time.monotonic() + grace_seconds + 5
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("kms-server process %d did not stop in time; killing it", process.pid)
            process.kill()
            process.wait()


def _reserve_port(listen: str) -> list[socket.socket]:
    """Binds (without listening) every address of `listen` with SO_REUSEPORT.

    Port 0 picks one free port for all processes; holding the sockets keeps it ours.
    A socket that does not listen is never handed a connection.
    """
    host = config.listen_host(listen)
    port = int(listen.rpartition(":")[2])
    if port != 0:
        refuse_port_in_use(host, port, listen)
    holders: list[socket.socket] = []
    try:
        for family, kind, proto, _, where in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            holder = socket.socket(family, kind, proto)
            holders.append(holder)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            holder.bind((where[0], port, *where[2:]))
            port = holder.getsockname()[1]
    except OSError as error:
        for holder in holders:
            holder.close()
        raise StartupError(f"cannot listen on {listen}: {error.strerror}") from None
    return holders


def _serve_metrics(settings: config.ServerSettings, directory: Path, engine: Engine) -> int | None:
    if not settings.metrics_listen:
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    registry.register(ActiveVersionCollector(lambda: active_versions(engine)))
    host, _, port = settings.metrics_listen.rpartition(":")
    try:
        http, _ = start_http_server(
            int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry
        )
    except OSError as error:
        raise StartupError(
            f"--metrics-listen: cannot listen on {settings.metrics_listen}: {error.strerror}"
        ) from None
    return int(http.server_port)


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)
