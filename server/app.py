"""Builds the running server from settings: `create_server(settings) -> KmsServer`."""

from __future__ import annotations

import asyncio
import logging
import socket
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import _async as health_aio  # grpc_health.v1.health.aio, by its module
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine, select

from kms.v1 import kms_pb2, kms_pb2_grpc
from server.api.auth import Authenticator, AuthFailureLimits, PolicyHolder
from server.api.methods import SERVICE_NAME
from server.api.observability import CallLog, CallObserver, Metrics
from server.api.pipeline import Limits, Pipeline, PipelineServer, PublicCalls
from server.api.servicer import KeyManagementServicer
from server.config import ServerSettings, listen_host, listen_port
from server.db import migrate
from server.db.audit_file import AuditFile, AuditSinkError
from server.db.engine import make_engine
from server.db.health import DatabaseProbe
from server.db.models import KeyRow
from server.event_loop import EventLoopThread
from server.keystore.root_keys import load_keyring
from server.policy import Policy
from server.reload import ReloadableTls, TlsFiles, TlsFilesError, reload_policy, reload_tls
from server.service import KeyManagementService
from server.thread_names import name_grpc_poller, name_os_thread

log = logging.getLogger(__name__)

# A KMS request is tiny; anything bigger is refused before it is parsed.
MAX_REQUEST_BYTES = 64 * 1024
# The active-version gauge reads at most this many keys per scrape.
MAX_KEYS_IN_METRICS = 10_000
STREAM_GOODBYE_SECONDS = 0.1
# Beyond both caps, room for calls refused at once (unknown or not allowed methods).
SPARE_RPCS = 16


class StartupError(Exception):
    """The server cannot start; the message says why and what to do."""


class HealthReport:
    """The serving status, told to grpc.aio's health servicer (its Watch streams hold no
    thread), which serves the main port and the --health-listen port."""

    def __init__(self, loop: EventLoopThread) -> None:
        self.aio = health_aio.HealthServicer()
        self._loop = loop

    def set(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        """From any thread but the event loop's."""
        for name in ("", SERVICE_NAME):
            self._loop.run(self.aio.set(name, status))

    def enter_graceful_shutdown(self) -> None:
        self._loop.run(self.aio.enter_graceful_shutdown())


@dataclass
class KmsServer:
    server: grpc.aio.Server
    loop: EventLoopThread
    port: int
    health: HealthReport
    engine: Engine
    policy: PolicyHolder
    settings: ServerSettings
    probe: DatabaseProbe | None = None
    health_server: grpc.aio.Server | None = None
    tls: ReloadableTls | None = None
    metrics: Metrics | None = None
    metrics_port: int | None = None
    service: KeyManagementService | None = None
    audit_file: AuditFile | None = None
    public_calls: PublicCalls | None = None
    authenticator: Authenticator | None = None

    def reload(self) -> bool:
        """Reloads the policy file and the TLS certificates and reopens the audit file (SIGHUP);
        True if all of it worked.

        Whatever fails to load is logged and left as it was: the server keeps serving.
        """
        policy_ok = reload_policy(self.policy, self.settings.policy_file)
        tls_ok = reload_tls(self.tls) if self.tls is not None else True
        audit_ok = self.audit_file.reopen() if self.audit_file is not None else True
        return policy_ok and tls_ok and audit_ok

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Reports NOT_SERVING first, then lets in-flight calls finish within the grace period."""
        if self.probe is not None:
            self.probe.stop()
        self.health.enter_graceful_shutdown()
        if self.public_calls is not None:
            # Watch streams have been told NOT_SERVING; they would never end by themselves.
            self.loop.run(_end_streams(self.public_calls))
        self.loop.run(self.server.stop(grace_seconds))
        if self.health_server is not None:
            self.loop.run(self.health_server.stop(0))
        if self.authenticator is not None:
            self.authenticator.flush()
        self.loop.stop()  # after the blocking calls still running in its executor
        if self.service is not None:
            self.service.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.audit_file is not None:
            self.audit_file.close()
        self.engine.dispose()


async def _end_streams(public_calls: PublicCalls) -> None:
    if public_calls.in_progress:
        await asyncio.sleep(STREAM_GOODBYE_SECONDS)  # lets watchers send NOT_SERVING first
    public_calls.stop_streams()


def open_database(settings: ServerSettings, *, upgrade: bool) -> Engine:
    engine = make_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )
    current, head = migrate.pending(engine)
    if current != head:
        if not upgrade:
            engine.dispose()
            raise StartupError(
                f"the database schema is at revision {current or 'none'} but this server needs "
                f"{head}; run: kms-server migrate (with the same --database-url / --data-dir)"
            )
        migrate.upgrade(engine)
    return engine


def create_server(
    settings: ServerSettings, *, upgrade_schema: bool = False, call_lines: CallLog | None = None
) -> KmsServer:
    """The server, started. `call_lines`: where each call's log line goes (default: a record
    of the `kms.call` logger)."""
    root_key = load_keyring(settings)
    policy = PolicyHolder(Policy.load(settings.policy_file))
    engine = open_database(settings, upgrade=upgrade_schema)
    # SQLite is a local file: there is no connection to lose, so nothing to probe.
    embedded = engine.dialect.name == "sqlite"
    probe = None if embedded else DatabaseProbe(settings.database_url)
    metrics: Metrics | None = None  # bound before anything below can fail
    service: KeyManagementService | None = None
    audit_file: AuditFile | None = None
    loop = EventLoopThread(blocking_workers=settings.max_workers)
    try:
        try:
            audit_file = AuditFile(settings.audit_file) if settings.audit_file else None
        except AuditSinkError as error:
            raise StartupError(f"--audit-file: {error}") from None
        service = KeyManagementService(
            engine,
            root_key,
            on_unavailable=probe.check_now if probe is not None else None,
            audit_sink=audit_file,
            material_cache_seconds=settings.material_cache_seconds,
            data_key_retry_window_seconds=settings.data_key_retry_window_seconds,
            destroy_delay_seconds=settings.destroy_delay_seconds,
            max_data_keys_per_version=settings.max_data_keys_per_version,
            destroy_approvals=lambda: policy.policy.destroy_approvals,
            # Dev mode allows any period, so tests can rotate every few seconds.
            min_rotation_seconds=0 if settings.dev else 3600,
        )
        service.check_root_key()
        # Carries out destructions that fell due while the server was down, then keeps looking.
        service.scheduler.start()
        if settings.metrics_listen:
            metrics = Metrics(lambda: active_versions(engine))
        # Every handler added to the server is wrapped once: observability (outermost: it sees
        # the final status of every call), then authentication (server/api/pipeline.py).
        authenticator = Authenticator(
            policy,
            service.audit.record_denial,
            AuthFailureLimits(
                burst=settings.auth_failure_burst,
                per_minute=settings.auth_failures_per_minute,
                summary_seconds=settings.auth_failure_summary_seconds,
            ),
        )
        pipeline = Pipeline(
            CallObserver(metrics, call_lines),
            authenticator,
            Limits(
                max_calls=settings.max_concurrent_rpcs,
                max_public_calls=settings.public_max_concurrent_rpcs,
                max_public_calls_per_connection=settings.public_max_rpcs_per_connection,
            ),
        )
        server = PipelineServer(loop.run(_aio_server(settings)), pipeline)
        kms_pb2_grpc.add_KeyManagementServiceServicer_to_server(
            KeyManagementServicer(service), server
        )
        health_report = HealthReport(loop)
        health_pb2_grpc.add_HealthServicer_to_server(health_report.aio, server)
        reflection.enable_server_reflection(
            (
                kms_pb2.DESCRIPTOR.services_by_name["KeyManagementService"].full_name,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        port, tls = _bind(server, settings)
        # A supervised process only records: its supervisor serves all processes' sum.
        serves_metrics = metrics is not None and settings.process_index is None
        try:
            metrics_port = (
                metrics.serve(settings.metrics_listen)
                if metrics and serves_metrics and settings.metrics_listen
                else None
            )
        except OSError as error:
            raise StartupError(
                f"--metrics-listen: cannot listen on {settings.metrics_listen}: {error.strerror}"
            ) from None
        loop.run(server.start())
        name_grpc_poller()  # started by grpc.aio from the loop's thread, named after it
    except BaseException:
        loop.stop()
        if service is not None:
            service.close()
        if probe is not None:
            probe.stop()
        if metrics is not None:
            metrics.stop()
        if audit_file is not None:
            audit_file.close()
        engine.dispose()
        raise
    health_report.set(health_pb2.HealthCheckResponse.SERVING)
    if probe is not None:
        # NOT_SERVING while the database does not answer, SERVING again once it does.
        probe.start(lambda serving: _report_database(health_report, serving))
    running = KmsServer(
        server,
        loop,
        port,
        health_report,
        engine,
        policy,
        settings,
        probe=probe,
        tls=tls,
        metrics=metrics,
        metrics_port=metrics_port,
        service=service,
        audit_file=audit_file,
        public_calls=pipeline.public_calls,
        authenticator=authenticator,
    )
    if settings.health_listen:
        try:
            running.health_server = loop.run(
                _start_health_server(
                    settings.health_listen,
                    health_report.aio,
                    pipeline,
                    shared=settings.process_index is not None,
                )
            )
        except BaseException:
            running.stop(0)
            raise
    return running


async def _aio_server(settings: ServerSettings) -> grpc.aio.Server:
    """The grpc.aio server, made on the loop it will run on."""
    return grpc.aio.server(
        # Where grpc itself runs a synchronous handler (health's Watch: a thread per stream).
        migration_thread_pool=futures.ThreadPoolExecutor(
            max_workers=settings.max_workers,
            thread_name_prefix="kms-grpc-sync",
            initializer=name_os_thread,
        ),
        options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            # grpc sets SO_REUSEPORT by default, so a second server on a port in use would
            # start and share it; only the processes of one --processes group may.
            ("grpc.so_reuseport", 1 if settings.process_index is not None else 0),
        ],
        # The pipeline counts kms.v1 and public calls apart (server/api/pipeline.py), so
        # health streams cannot take kms.v1's places; grpc's own cap only backs both up.
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs
        + settings.public_max_concurrent_rpcs
        + SPARE_RPCS,
    )


async def _start_health_server(
    listen: str, servicer: health_aio.HealthServicer, pipeline: Pipeline, *, shared: bool
) -> grpc.aio.Server:
    """A plaintext loopback port serving only health, for probes that hold no certificate.

    On the event loop, through the same pipeline: its calls and Watch streams count
    towards the same public caps and end at shutdown like the main port's. `shared`: the
    processes of one --processes group all bind it (SO_REUSEPORT).
    """
    server = PipelineServer(
        grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.so_reuseport", 1 if shared else 0),
            ]
        ),
        pipeline,
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as error:
        raise StartupError(f"--health-listen: cannot listen on {listen}: {error}") from None
    if port == 0:
        raise StartupError(f"--health-listen: cannot listen on {listen} (in use?)")
    await server.start()
    return server


def _report_database(report: HealthReport, serving: bool) -> None:
    report.set(
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )


def active_versions(engine: Engine) -> list[tuple[str, int]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(KeyRow.name, KeyRow.active_version)
            .order_by(KeyRow.name)
            .limit(MAX_KEYS_IN_METRICS)
        ).all()
    return [(str(name), int(version or 0)) for name, version in rows]


def refuse_port_in_use(host: str, port: int, listen: str) -> None:
    """SO_REUSEPORT would let this group share a port another server already serves; a bind
    without it fails while any socket holds the port (TIME_WAIT aside, with SO_REUSEADDR)."""
    for family, kind, proto, _, where in socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                probe.bind(where)
            except OSError as error:
                raise StartupError(
                    f"--listen: cannot listen on {listen}: {error.strerror} (another kms-server?)"
                ) from None


def _bind(server: grpc.aio.Server, settings: ServerSettings) -> tuple[int, ReloadableTls | None]:
    tls = None
    port_wanted = listen_port(settings.listen)
    if settings.process_index is None and port_wanted != 0:
        # Said in our words before grpc tries (and logs its own lines about it).
        refuse_port_in_use(listen_host(settings.listen), port_wanted, settings.listen)
    try:
        if settings.uses_tls:
            assert settings.tls_cert is not None and settings.tls_key is not None
            # Reloadable on SIGHUP: new connections get the certificates read last.
            tls = ReloadableTls(
                TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            )
            port = server.add_secure_port(settings.listen, tls.credentials)
        else:
            port = server.add_insecure_port(settings.listen)
    except TlsFilesError as error:
        raise StartupError(f"cannot use the TLS files: {error}") from None
    except (OSError, RuntimeError) as error:
        raise StartupError(f"cannot listen on {settings.listen}: {error}") from None
    if port == 0:
        raise StartupError(
            f"--listen: cannot listen on {settings.listen}: the address is in use or not this "
            "machine's (another kms-server? use another port, or --processes N to run several)"
        )
    return port, tls
