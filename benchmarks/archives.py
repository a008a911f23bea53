"""Raw AES-GCM at the archive's segment size, and kms-backup / kms-restore as subprocesses."""

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
        "backup": figures(made),
        "restore": figures(opened),
    }
