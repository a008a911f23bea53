"""Archives written in format version 1 still restore, with the server data that made them."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, child_environment
from tests.e2e.conftest import STARTUP_TIMEOUT, DevServer

FIXTURE = REPO / "tests" / "fixtures" / "archive-v1"
MTIME = 946_684_800


@pytest.fixture
def v1_server(tmp_path: Path) -> Iterator[DevServer]:
    """`kms-server --dev` on a copy of the data directory that issued the fixture's keys."""
    data_dir = tmp_path / "kms-data"
    shutil.copytree(FIXTURE / "kms-data", data_dir)
    (data_dir / "root.key").chmod(0o600)  # git keeps no mode bits but the executable one
    # The policy of that time (roles without grants) is refused now: dev mode writes today's
    # from the same tokens.
    (data_dir / "policy.toml").unlink(missing_ok=True)
    ready_file = tmp_path / "ready"
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115  (closed in finally)
    process = subprocess.Popen(
        [sys.executable, "-m", "server.main", "--dev", "--data-dir", str(data_dir),
         "--ready-file", str(ready_file), "--listen", "127.0.0.1:0"],
        cwd=REPO, env=child_environment(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not ready_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"kms-server did not start: {(tmp_path / 'server.log').read_text()}")
            time.sleep(0.05)
        yield DevServer(ready_file.read_text().strip(), data_dir, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def restore(server: DevServer, name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return server.run("restore", str(FIXTURE / name), *args, role="restore")


def test_version_1_file_archive_restores(v1_server: DevServer, tmp_path: Path) -> None:
    done = restore(v1_server, "file.kms", "-o", str(tmp_path / "file.txt"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "file.txt").read_bytes() == b"version 1 file payload\n" * 10


def test_version_1_tree_archive_restores(v1_server: DevServer, tmp_path: Path) -> None:
    target = tmp_path / "tree"
    done = restore(v1_server, "tree.kms", "-o", str(target))
    assert done.returncode == 0, done.stderr
    assert (target / "a.txt").read_bytes() == b"alpha\n"
    assert (target / "sub" / "b.bin").read_bytes() == bytes(range(256))
    assert os.readlink(target / "link") == "a.txt"
    assert stat.S_ISLNK((target / "link").lstat().st_mode)
    for path in ("a.txt", "sub/b.bin", "sub"):
        assert (target / path).lstat().st_mtime == MTIME


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("stream.kms", b"streamed through stdin\n"),
        ("small-segments.kms", (FIXTURE / "small-segments.expected").read_bytes()),
    ],
)
def test_version_1_stream_archives_restore_to_stdout(
    v1_server: DevServer, name: str, expected: bytes
) -> None:
    done = restore(v1_server, name, "-o", "-")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected


def test_a_damaged_version_1_archive_is_refused(v1_server: DevServer, tmp_path: Path) -> None:
    damaged = bytearray((FIXTURE / "small-segments.kms").read_bytes())
    damaged[-200] ^= 0x01
    (tmp_path / "damaged.kms").write_bytes(bytes(damaged))
    done = v1_server.run("restore", "--verify", str(tmp_path / "damaged.kms"), role="restore")
    assert done.returncode == 1
    assert b"failed authentication" in done.stderr


def test_a_version_1_tree_lists_and_its_header_inspects(v1_server: DevServer) -> None:
    listing = restore(v1_server, "tree.kms", "--list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.decode().splitlines()
    assert any(line.endswith(" sub/b.bin") and " 256 " in line for line in lines)
    assert any(line.endswith(" link -> a.txt") for line in lines)
    inspected = restore(v1_server, "tree.kms", "--inspect")
    assert inspected.returncode == 0, inspected.stderr
    assert b"format version: 1" in inspected.stdout
    assert b"compression: none" in inspected.stdout
