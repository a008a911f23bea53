"""Raw AES-GCM at the archive's segment size, a read-seal-write loop over the same files, and
kms-backup / kms-restore as subprocesses."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.servers import REPO, KmsProcess, child_environment
from client.archive import DEFAULT_SEGMENT_SIZE

MB = 1_000_000


def aesgcm_throughput(seconds: float) -> dict[str, float]:
    """MB/s of one AESGCM object sealing and opening 1 MiB segments with 41 bytes of AAD."""
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    segment = os.urandom(DEFAULT_SEGMENT_SIZE)
    aad = os.urandom(41)
    nonce = os.urandom(12)
    sealed = aead.encrypt(nonce, segment, aad)
    figures: dict[str, float] = {}
    for name in ("encrypt", "decrypt"):
        count = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            for _ in range(8):
                if name == "encrypt":
                    aead.encrypt(nonce, segment, aad)
                else:
                    aead.decrypt(nonce, sealed, aad)
            count += 8
        elapsed = time.perf_counter() - started
        figures[f"{name}_mb_per_s"] = round(count * DEFAULT_SEGMENT_SIZE / elapsed / MB, 1)
    return figures


def io_loop_throughput(source: Path, scratch: Path) -> dict[str, float]:
    """MB/s of the plainest program doing an archive's work on one thread, in this process.

    Read `source` in 1 MiB segments, seal each with AES-GCM (into a reused buffer when
    cryptography has `encrypt_into`), write it to a new file beside; then the reverse into
    another new file. The same files, memory and page-cache costs as the programs, without
    their start-up, key RPC, header or threads: what "I/O plus AES-GCM" costs here. The
    better of two rounds (a single round on this shared machine varies by up to 2x).
    """
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    aad = os.urandom(41)
    size = source.stat().st_size
    sealed, opened = scratch / "io-loop.sealed", scratch / "io-loop.opened"
    into = hasattr(aead, "encrypt_into")
    figures: dict[str, float] = {}
    try:
        for name, src, dest, chunk in 2 * (
            ("encrypt", source, sealed, DEFAULT_SEGMENT_SIZE),
            ("decrypt", sealed, opened, DEFAULT_SEGMENT_SIZE + 16),
        ):
            encrypt = name == "encrypt"
            buffer = memoryview(bytearray(chunk))
            output = memoryview(bytearray(chunk + 16 if encrypt else chunk - 16))
            started = time.perf_counter()
            with open(src, "rb", buffering=0) as reader, open(dest, "wb") as writer:
                segment = 0
                while count := reader.readinto(buffer):
                    nonce = segment.to_bytes(12, "big")
                    if encrypt and into:
                        out = output[: count + 16]
                        aead.encrypt_into(nonce, buffer[:count], aad, out)
                    elif into:
                        out = output[: count - 16]
                        aead.decrypt_into(nonce, buffer[:count], aad, out)
                    elif encrypt:
                        out = memoryview(aead.encrypt(nonce, buffer[:count], aad))
                    else:
                        out = memoryview(aead.decrypt(nonce, buffer[:count], aad))
                    writer.write(out)
                    segment += 1
                writer.flush()
                os.fsync(writer.fileno())
            elapsed = time.perf_counter() - started
            best = max(figures.get(f"{name}_mb_per_s", 0.0), round(size / elapsed / MB, 1))
            figures[f"{name}_mb_per_s"] = best
    finally:
        sealed.unlink(missing_ok=True)
        opened.unlink(missing_ok=True)
    return figures


@dataclass
class ChildRun:
    seconds: float
    max_rss_kib: int
    cpu_seconds: float
    returncode: int


def run_child(command: list[str]) -> ChildRun:
    """Runs a program to completion under `benchmarks.rusage`, which reports its own rusage."""
    wrapper = [sys.executable, "-S", "-m", "benchmarks.rusage"]
    completed = subprocess.run(
        [*wrapper, *command], cwd=REPO, env=child_environment(), capture_output=True, check=False
    )
    if completed.returncode != 0 or not completed.stdout.strip():
        raise RuntimeError(f"{command[:3]} failed: {completed.stderr.decode()[-2000:]}")
    figures = json.loads(completed.stdout.decode().strip().splitlines()[-1])
    if figures["returncode"] != 0:
        raise RuntimeError(
            f"{command[:3]} exited {figures['returncode']}: {completed.stderr.decode()[-2000:]}"
        )
    return ChildRun(
        figures["seconds"], figures["max_rss_kib"], figures["cpu_seconds"], figures["returncode"]
    )


def _program(name: str, module: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def archive_round_trip(
    kms: KmsProcess, key_name: str, size_bytes: int, shm: Path
) -> dict[str, dict[str, float]]:
    """kms-backup then kms-restore of a `size_bytes` file, all three files in memory (/dev/shm)."""
    shm.mkdir(parents=True, exist_ok=True)
    source, archive, restored = shm / "source.bin", shm / "source.kms", shm / "restored.bin"
    try:
        block = os.urandom(64 << 20)
        with open(source, "wb") as out:
            for offset in range(0, size_bytes, len(block)):
                out.write(block[: min(len(block), size_bytes - offset)])
        del block
        io_loop = io_loop_throughput(source, shm)
        backup = _program("kms-backup", "client.backup")
        restore = _program("kms-restore", "client.restore")
        connection = ["--addr", kms.address]
        # The fixed cost of a program start (interpreter, grpc and cryptography imports).
        startup = min(run_child([*backup, "--help"]).seconds for _ in range(3))
        made = run_child(
            [*backup, "create", "--key", key_name, str(source), "-o", str(archive), *connection,
             "--token-file", str(kms.token_file("backup"))]
        )  # fmt: skip
        opened = run_child(
            [*restore, str(archive), "-o", str(restored), *connection,
             "--token-file", str(kms.token_file("restore"))]
        )  # fmt: skip
        if not filecmp.cmp(source, restored, shallow=False):
            raise RuntimeError("the restored file differs from the source")
        archive_bytes = archive.stat().st_size
    finally:
        shutil.rmtree(shm, ignore_errors=True)

    def figures(run: ChildRun) -> dict[str, float]:
        return {
            "seconds": round(run.seconds, 3),
            "mb_per_s": round(size_bytes / run.seconds / MB, 1),
            "mb_per_s_excluding_startup": round(
                size_bytes / max(run.seconds - startup, 1e-6) / MB, 1
            ),
            "peak_rss_mib": round(run.max_rss_kib / 1024, 1),
            "cpu_seconds": round(run.cpu_seconds, 3),
        }

    return {
        "input": {
            "bytes": size_bytes,
            "archive_bytes": archive_bytes,
            "startup_s": round(startup, 3),
        },
        "io_loop": io_loop,
        "backup": figures(made),
        "restore": figures(opened),
    }
