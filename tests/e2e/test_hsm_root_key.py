"""The whole demo workflow as a user runs it, on `kms-server --dev --root-key pkcs11:...`: a
root key made non-extractable inside a SoftHSM2 token; and `kms-server init`."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.policy import Policy
from tests.conftest import REPO, child_environment
from tests.e2e.conftest import STARTUP_TIMEOUT, DevServer
from tests.softhsm import SoftHsm, hsm_fixture  # noqa: F401

KEY = "payroll"


@pytest.fixture
def hsm_server(tmp_path: Path, hsm: SoftHsm) -> Iterator[DevServer]:
    data_dir, ready = tmp_path / "kms-data", tmp_path / "ready"
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115  (closed in finally)
    env = {**child_environment(), "KMS_PKCS11_PIN": hsm.pin_file.read_text().strip()}
    process = subprocess.Popen(
        [sys.executable, "-m", "server.main", "--dev", "--data-dir", str(data_dir),
         "--ready-file", str(ready), "--listen", "127.0.0.1:0", "--root-key", hsm.uri(),
         "--pkcs11-module", hsm.module],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"kms-server did not start: {(tmp_path / 'server.log').read_text()}")
            time.sleep(0.05)
        yield DevServer(ready.read_text().strip(), data_dir, process)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        log.close()
    assert process.returncode == 0
    server_log = (tmp_path / "server.log").read_text()
    assert f"dev mode: root key {hsm.uri()}" in server_log
    assert hsm.pin_file.read_text().strip() not in server_log


def test_the_demo_workflow_runs_on_a_non_extractable_hsm_root_key(
    hsm_server: DevServer, hsm: SoftHsm, tmp_path: Path
) -> None:
    assert hsm.key_attribute("EXTRACTABLE") is False and hsm.key_attribute("SENSITIVE") is True
    assert not (hsm_server.data_dir / "root.key").exists(), "dev mode made a file root key"
    run = hsm_server.run
    run("kmsctl", "register", KEY, "--activate", role="admin", check=True)
    (tmp_path / "old.txt").write_text("made under version 1")
    run("backup", "create", "--key", KEY, str(tmp_path / "old.txt"), "-o",
        str(tmp_path / "old.kbk"), role="backup", check=True)  # fmt: skip
    run("kmsctl", "register", KEY, role="admin", check=True)
    run("kmsctl", "rotate", KEY, "2", "--reason", "yearly", role="admin", check=True)
    (tmp_path / "new.txt").write_text("made under version 2")
    run("backup", "create", "--key", KEY, str(tmp_path / "new.txt"), "-o",
        str(tmp_path / "new.kbk"), role="backup", check=True)  # fmt: skip
    for name in ("old", "new"):
        run("restore", str(tmp_path / f"{name}.kbk"), "-o", str(tmp_path / f"{name}.out"),
            role="restore", check=True)  # fmt: skip
        assert (tmp_path / f"{name}.out").read_text() == (tmp_path / f"{name}.txt").read_text()
    verified = run("kmsctl", "audit", "verify", "--json", role="auditor", check=True)
    assert json.loads(verified.stdout)["intact"] is True


def test_init_makes_a_private_production_data_directory_without_dev_tokens(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "prod"
    done = subprocess.run(
        [sys.executable, "-m", "server.main", "init", "--data-dir", str(data_dir)],
        capture_output=True, text=True, cwd=REPO, env=child_environment(), check=True,
    )  # fmt: skip
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "root.key").stat().st_mode) == 0o600
    assert (data_dir / "root.key").stat().st_size == 32
    assert stat.S_IMODE((data_dir / "policy.toml").stat().st_mode) == 0o600
    assert not (data_dir / "tokens").exists()
    assert Policy.load(data_dir / "policy.toml").principals == {}
    assert "token_sha256" in (data_dir / "policy.toml").read_text()  # the instructions
    assert str(data_dir / "root.key") in done.stdout
    key = (data_dir / "root.key").read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "server.main", "init", "--data-dir", str(data_dir)],
        capture_output=True, text=True, cwd=REPO, env=child_environment(), check=True,
    )  # fmt: skip
    assert "nothing was changed" in again.stdout
    assert (data_dir / "root.key").read_bytes() == key
    # The server starts on it (TLS aside), with nobody allowed in yet.
    started = subprocess.Popen(
        [sys.executable, "-m", "server.main", "--data-dir", str(data_dir), "--insecure",
         "--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "ready")],
        cwd=REPO, env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not (tmp_path / "ready").exists():
            assert started.poll() is None and time.monotonic() < deadline, started.stdout
            time.sleep(0.05)
    finally:
        started.send_signal(signal.SIGTERM)
        started.wait(timeout=15)
