"""Raw AES-GCM at the archive's segment size, a read-seal-write loop over the same files,
kms-backup / kms-restore as subprocesses, and the same programs against `age`.

    python -m benchmarks.archives [--size-mib 1024] [--rounds 3] [--shm-dir /dev/shm]

runs only the archive phase (with its own kms-server) and prints the comparison.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.servers import REPO, KmsProcess, child_environment, kms_server
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


def write_sql_dump(path: Path, size_bytes: int) -> None:
    """A pg_dump-like text: COPY blocks of orders and customers, varied enough to be honest."""
    rng = random.Random(17)
    words = [
        "alpha",
        "bravo",
        "carrier",
        "delta",
        "express",
        "freight",
        "global",
        "harbor",
        "invoice",
        "journal",
        "ledger",
        "metro",
        "north",
        "orbit",
        "parcel",
        "quay",
    ]
    cities = ["Berlin", "Lisbon", "Osaka", "Quito", "Nairobi", "Oslo", "Perth", "Dakar"]
    written, table = 0, 0
    with open(path, "wb") as out:
        while written < size_bytes:
            table += 1
            lines = [
                f"\n--\n-- Data for Name: orders_{table}; Type: TABLE DATA\n--\n\n"
                f"COPY public.orders_{table} (id, customer, city, amount, status, note, "
                "created_at) FROM stdin;\n"
            ]
            base = rng.randrange(10**6, 10**9)
            for i in range(20_000):
                lines.append(
                    f"{base + i}\t{rng.choice(words)}-{rng.randrange(100_000)}\t"
                    f"{rng.choice(cities)}\t{rng.randrange(1, 10**6) / 100:.2f}\t"
                    f"{rng.choice(('paid', 'open', 'shipped', 'refunded'))}\t"
                    f"{rng.choice(words)} {rng.choice(words)} {rng.randrange(10**4)}\t"
                    f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} "
                    f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}\n"
                )
            lines.append("\\.\n")
            block = "".join(lines).encode()[: size_bytes - written]
            out.write(block)
            written += len(block)


def write_random(path: Path, size_bytes: int) -> None:
    block = os.urandom(64 << 20)
    with open(path, "wb") as out:
        for offset in range(0, size_bytes, len(block)):
            out.write(block[: min(len(block), size_bytes - offset)])


def _program(name: str, module: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def archive_round_trip(
    kms: KmsProcess, key_name: str, size_bytes: int, shm: Path, *, against_age: bool = True
) -> dict[str, Any]:
    """kms-backup then kms-restore of a `size_bytes` file, all three files in memory (/dev/shm),
    then (unless `against_age` is false) the comparison with age, printed as it ends."""
    shm.mkdir(parents=True, exist_ok=True)
    source, archive, restored = shm / "source.bin", shm / "source.kms", shm / "restored.bin"
    try:
        write_random(source, size_bytes)
        io_loop = io_loop_throughput(source, shm)
        backup = _program("kms-backup", "client.backup")
        restore = _program("kms-restore", "client.restore")
        connection = ["--addr", kms.address]
        # The fixed cost of a program start (interpreter, grpc and cryptography imports).
        startup = min(run_child([*backup, "--help"]).seconds for _ in range(3))
        made = run_child(
            [
                *backup,
                "create",
                "--key",
                key_name,
                str(source),
                "-o",
                str(archive),
                *connection,
                "--token-file",
                str(kms.token_file("backup")),
            ]
        )
        opened = run_child(
            [
                *restore,
                str(archive),
                "-o",
                str(restored),
                *connection,
                "--token-file",
                str(kms.token_file("restore")),
            ]
        )
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

    results: dict[str, Any] = {
        "input": {
            "bytes": size_bytes,
            "archive_bytes": archive_bytes,
            "startup_s": round(startup, 3),
        },
        "io_loop": io_loop,
        "backup": figures(made),
        "restore": figures(opened),
    }
    if against_age:
        results["age"] = age_comparison(kms, key_name, size_bytes, shm.with_name(shm.name + "-age"))
        print(render_age(results["age"]), flush=True)
    return results


AGE_MISSING = "age is not installed (Debian: apt-get install age); the comparison was skipped"


def _shell(pipeline: str) -> list[str]:
    return ["/bin/sh", "-c", pipeline]


def _best(runs: list[ChildRun], size_bytes: int) -> dict[str, Any]:
    """The fastest of the alternating runs, with the median and every run beside it, and the
    highest RSS."""
    fastest = min(r.seconds for r in runs)
    return {
        "mb_per_s": round(size_bytes / fastest / MB, 1),
        "median_mb_per_s": round(size_bytes / statistics.median(r.seconds for r in runs) / MB, 1),
        "runs_mb_per_s": [round(size_bytes / r.seconds / MB, 1) for r in runs],
        "seconds": round(fastest, 3),
        "peak_rss_mib": round(max(r.max_rss_kib for r in runs) / 1024, 1),
        "cpu_seconds": round(min(r.cpu_seconds for r in runs), 3),
    }


def age_comparison(
    kms: KmsProcess, key_name: str, size_bytes: int, shm: Path, rounds: int = 3
) -> dict[str, Any]:
    """kms-backup / kms-restore against age on the same files in memory, runs alternating.

    A random file: encrypt, decrypt to a file, decrypt to stdout read by /dev/null.
    A SQL-dump-like text: kms-backup (zstd per segment) against `zstd -3 | age`, both ways.
    """
    age = shutil.which("age")
    keygen = shutil.which("age-keygen")
    if age is None or keygen is None:
        return {"skipped": AGE_MISSING}
    zstd = shutil.which("zstd")
    shm.mkdir(parents=True, exist_ok=True)
    backup = _program("kms-backup", "client.backup")
    restore = _program("kms-restore", "client.restore")
    connection = ["--addr", kms.address]
    make = [
        *backup,
        "create",
        "--key",
        key_name,
        *connection,
        "--token-file",
        str(kms.token_file("backup")),
    ]
    unmake = [*restore, *connection, "--token-file", str(kms.token_file("restore"))]
    identity = shm / "age.key"
    results: dict[str, Any] = {"rounds": rounds, "bytes": size_bytes}
    try:
        subprocess.run([keygen, "-o", str(identity)], check=True, capture_output=True)
        recipient = subprocess.run(
            [keygen, "-y", str(identity)], check=True, capture_output=True, text=True
        ).stdout.strip()
        source, plain = shm / "random.bin", shm / "out.bin"
        kms_archive, age_archive = shm / "random.kms", shm / "random.age"
        write_random(source, size_bytes)
        runs: dict[str, list[ChildRun]] = {}

        def run(name: str, command: list[str]) -> None:
            runs.setdefault(name, []).append(run_child(command))

        for _ in range(rounds):
            for target in (age_archive, kms_archive, plain):
                target.unlink(missing_ok=True)
            run("age_encrypt", [age, "-r", recipient, "-o", str(age_archive), str(source)])
            run("kms_encrypt", [*make, str(source), "-o", str(kms_archive), "--force"])
            run(
                "age_decrypt_file",
                [age, "-d", "-i", str(identity), "-o", str(plain), str(age_archive)],
            )
            plain.unlink()
            run("kms_decrypt_file", [*unmake, str(kms_archive), "-o", str(plain)])
            if not filecmp.cmp(source, plain, shallow=False):
                raise RuntimeError("kms-restore gave back other bytes than the source")
            plain.unlink()
            run("age_decrypt_stdout", [age, "-d", "-i", str(identity), str(age_archive)])
            run("kms_decrypt_stdout", [*unmake, str(kms_archive), "-o", "-"])
        results["random"] = {name: _best(r, size_bytes) for name, r in runs.items()}
        results["random"]["kms_archive_bytes"] = kms_archive.stat().st_size
        results["random"]["age_archive_bytes"] = age_archive.stat().st_size
        for path in (source, kms_archive, age_archive):
            path.unlink()

        if zstd is None:
            results["text"] = {"skipped": "zstd is not installed (apt-get install zstd)"}
            return results
        text, packed = shm / "dump.sql", shm / "dump.sql.zst.age"
        kms_text = shm / "dump.kms"
        write_sql_dump(text, size_bytes)
        runs = {}
        for _ in range(rounds):
            packed.unlink(missing_ok=True)
            run(
                "zstd_age_encrypt",
                _shell(f"{zstd} -3 -q -c {text} | {age} -r {recipient} -o {packed}"),
            )
            run("kms_encrypt", [*make, str(text), "-o", str(kms_text), "--force"])
            run(
                "zstd_age_decrypt_file",
                _shell(f"{age} -d -i {identity} {packed} | {zstd} -d -q -c > {plain}"),
            )
            plain.unlink()
            run("kms_decrypt_file", [*unmake, str(kms_text), "-o", str(plain)])
            if not filecmp.cmp(text, plain, shallow=False):
                raise RuntimeError("kms-restore gave back other bytes than the text")
            plain.unlink()
        results["text"] = {name: _best(r, size_bytes) for name, r in runs.items()}
        results["text"]["kms_archive_bytes"] = kms_text.stat().st_size
        results["text"]["zstd_age_archive_bytes"] = packed.stat().st_size
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return results


def render_age(results: dict[str, Any]) -> str:
    if "skipped" in results:
        return f"age comparison: {results['skipped']}"
    lines = [
        f"against age, {results['bytes'] >> 20} MiB in memory, best of {results['rounds']} "
        "alternating runs (median in brackets), MB/s and peak RSS; the target on the best and "
        "on the median:"
    ]

    def row(label: str, mine: dict[str, float], theirs: dict[str, float], other: str) -> str:
        verdict = "/".join(
            "met" if mine[figure] >= theirs[figure] else "NOT met"
            for figure in ("mb_per_s", "median_mb_per_s")
        )
        return (
            f"  {label:<26} kms {mine['mb_per_s']:>7} ({mine['median_mb_per_s']}) "
            f"{mine['peak_rss_mib']:>5} MiB   {other} {theirs['mb_per_s']:>7} "
            f"({theirs['median_mb_per_s']}) {theirs['peak_rss_mib']:>5} MiB   {verdict}"
        )

    r = results["random"]
    for mode in ("encrypt", "decrypt_file", "decrypt_stdout"):
        lines.append(row(f"random {mode}", r[f"kms_{mode}"], r[f"age_{mode}"], "age"))
    t = results.get("text", {})
    if "skipped" in t:
        lines.append(f"  text: {t['skipped']}")
    elif t:
        for mode in ("encrypt", "decrypt_file"):
            lines.append(
                row(f"SQL text {mode}", t[f"kms_{mode}"], t[f"zstd_age_{mode}"], "zstd -3|age")
            )
        smaller = t["kms_archive_bytes"] < t["zstd_age_archive_bytes"]
        lines.append(
            f"  SQL text archive: kms {t['kms_archive_bytes']:,} bytes, zstd -3|age "
            f"{t['zstd_age_archive_bytes']:,} bytes   {'met' if smaller else 'NOT met'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.archives", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024, help="input size (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    size = args.size_mib << 20
    work = args.shm_dir / f"kms-bench-{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {}
    work.mkdir(parents=True)
    try:
        with kms_server(work / "kms") as kms:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "client.kmsctl",
                    "register",
                    "bench",
                    "--activate",
                    "--addr",
                    kms.address,
                    "--token-file",
                    str(kms.token_file("admin")),
                ],
                check=True,
                cwd=REPO,
                env=child_environment(),
                capture_output=True,
            )
            results["round_trip"] = archive_round_trip(
                kms, "bench", size, work / "trip", against_age=False
            )
            results["age"] = age_comparison(kms, "bench", size, work / "age", args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    trip = results["round_trip"]
    print(f"io_loop floor: {trip['io_loop']}; program start {trip['input']['startup_s']} s")
    for name in ("backup", "restore"):
        print(f"kms-{name}: {trip[name]}")
    print(render_age(results["age"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
