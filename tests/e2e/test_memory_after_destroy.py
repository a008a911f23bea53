"""After a destroy and the cache bound, no copy of the version's material is left anywhere in
the server process's memory: a scan of /proc/PID/mem, as a memory dump would see it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, text

from kms.v1 import kms_pb2, kms_pb2_grpc
from server.keystore.crypto import RootKey
from tests.conftest import REPO, child_environment

KEY = "shredded"
CACHE_SECONDS = 1


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Reads every readable mapping of the process (root, or the same user, may)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        for line in maps:
            match = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            if not match or not match.group(3).startswith("r"):
                continue
            start, end = int(match.group(1), 16), int(match.group(2), 16)
            try:
                memory.seek(start)
                if needle in memory.read(end - start):
                    return True
            except (OSError, OverflowError, ValueError):
                continue  # [vvar] and the like cannot be read
    return False


def test_no_copy_of_destroyed_material_is_left_in_server_memory(tmp_path: Path) -> None:
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs /proc")
    data_dir, ready = tmp_path / "kms", tmp_path / "ready"
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "server.main", "--dev", "--data-dir", str(data_dir),
         "--listen", "127.0.0.1:0", "--ready-file", str(ready),
         "--material-cache-seconds", str(CACHE_SECONDS), "--destroy-delay", "0s"],
        cwd=REPO, env=child_environment(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        channel = grpc.insecure_channel(ready.read_text().strip())
        stub = kms_pb2_grpc.KeyManagementServiceStub(channel)

        def token(role: str) -> tuple[tuple[str, str]]:
            return (
                ("authorization", f"Bearer {(data_dir / 'tokens' / role).read_text().strip()}"),
            )

        admin, backup = token("admin"), token("backup")
        stub.RegisterKeyVersion(
            kms_pb2.RegisterKeyVersionRequest(key_name=KEY, activate_first_version=True),
            metadata=admin,
        )
        stub.GetActiveKey(
            kms_pb2.GetActiveKeyRequest(key_name=KEY, backup_id="b-1"), metadata=backup
        )
        engine = create_engine(f"sqlite:///{data_dir / 'kms.sqlite3'}")
        with engine.connect() as connection:
            blob = connection.execute(
                text("SELECT wrapped_material FROM key_versions WHERE version = 1")
            ).scalar_one()
        engine.dispose()
        material = bytes(RootKey.load(data_dir / "root.key").unwrap_version_material(KEY, 1, blob))
        assert _memory_holds(process.pid, material), "the scan cannot see the cached material"

        stub.RegisterKeyVersion(kms_pb2.RegisterKeyVersionRequest(key_name=KEY), metadata=admin)
        stub.RotateActive(kms_pb2.RotateActiveRequest(key_name=KEY, to_version=2), metadata=admin)
        stub.DestroyKeyVersion(
            kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=1), metadata=admin
        )
        time.sleep(CACHE_SECONDS + 2.5)  # the bound, then the sweep that wipes
        assert not _memory_holds(process.pid, material), "destroyed material is still in memory"
        channel.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        log.close()
