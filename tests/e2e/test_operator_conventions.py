"""The programs behave like operator tools: against a real `kms-server --dev`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, child_environment
from tests.e2e.conftest import DevServer

KEY = "ledger"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_second_server_on_a_port_in_use_is_refused(dev_server: DevServer, tmp_path: Path) -> None:
    second = subprocess.run(
        [
            *(sys.executable, "-m", "server.main", "--dev"),
            *("--data-dir", str(tmp_path / "other"), "--listen", dev_server.address),
        ],
        capture_output=True,
        cwd=REPO,
        env=child_environment(),
        timeout=60,
    )
    assert second.returncode == 2
    assert b"--listen" in second.stderr and b"in use" in second.stderr
    assert b"Traceback" not in second.stderr
    # Not even gRPC's own log line: one message.
    assert not any(line.startswith(b"E1") for line in second.stderr.splitlines())


def test_the_database_and_its_wal_files_are_owner_only(dev_server: DevServer) -> None:
    dev_server.run("kmsctl", "register", KEY, "--activate", role="admin", check=True)
    database = dev_server.data_dir / "kms.sqlite3"
    for path in (database, database.with_name("kms.sqlite3-wal"), dev_server.data_dir / "root.key"):
        assert path.exists(), path
        assert _mode(path) == 0o600, f"{path} is {oct(_mode(path))}"


def test_migrate_runs_with_umask_077_and_repairs_an_open_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env = child_environment()
    migrate = [sys.executable, "-m", "server.main", "migrate", "--data-dir", str(data)]
    old_umask = os.umask(0o022)
    try:
        done = subprocess.run(migrate, capture_output=True, cwd=REPO, env=env, timeout=120)
    finally:
        os.umask(old_umask)
    assert done.returncode == 0, done.stderr
    database = data / "kms.sqlite3"
    assert _mode(database) == 0o600
    # A database an older release left 0644 is made 0600 again.
    os.chmod(database, 0o644)
    again = subprocess.run(migrate, capture_output=True, cwd=REPO, env=env, timeout=120)
    assert again.returncode == 0
    assert _mode(database) == 0o600


def test_destroy_checks_the_version_before_asking(dev_server: DevServer) -> None:
    dev_server.run("kmsctl", "register", KEY, "--activate", role="admin", check=True)
    missing = dev_server.run("kmsctl", "destroy", KEY, "7", role="admin")
    assert missing.returncode == 1
    assert b"NOT_FOUND" in missing.stderr and b"--yes" not in missing.stderr
    active = dev_server.run("kmsctl", "destroy", KEY, "1", role="admin")
    assert active.returncode == 1
    assert b"kmsctl rotate" in active.stderr  # what to do instead, in commands
    versions = json.loads(
        dev_server.run("kmsctl", "versions", KEY, "--json", role="admin", check=True).stdout
    )
    assert [v["state"] for v in versions] == ["KEY_VERSION_STATE_ENABLED"]


def test_messages_speak_in_commands(dev_server: DevServer, tmp_path: Path) -> None:
    dev_server.run("kmsctl", "register", KEY, role="admin", check=True)  # not active
    (tmp_path / "f").write_text("x")
    backup = dev_server.run(
        "backup", "create", "--key", KEY, str(tmp_path / "f"), "-o", str(tmp_path / "f.kms"),
        role="backup",
    )  # fmt: skip
    assert backup.returncode == 1
    assert f"kmsctl rotate {KEY} VERSION".encode() in backup.stderr
    rotated = dev_server.run("kmsctl", "rotate", KEY, "1", role="admin", check=True)
    assert b"was no version" in rotated.stdout and b"0 ->" not in rotated.stdout


def test_audit_list_escapes_what_could_spoof_the_table(dev_server: DevServer) -> None:
    # Invalid key names are refused, and the refusal is audited with the name as given
    # (the server keeps at most 128 characters of it).
    spoof = "evil\u202e" + "x" * 123
    for name in (spoof, "y" * 129):
        refused = dev_server.run("kmsctl", "versions", name, role="admin")
        assert refused.returncode == 1 and b"INVALID_ARGUMENT" in refused.stderr
    table = dev_server.run("kmsctl", "audit", "list", role="auditor", check=True).stdout.decode()
    assert "\u202e" not in table and "evil" in table
    lines = table.splitlines()
    assert max(len(line) for line in lines) < 260, "a long key name widened every row"
    as_json = dev_server.run("kmsctl", "audit", "list", "--json", role="auditor", check=True)
    # JSON is not cut: the whole stored value (the server stores control and format
    # characters escaped already).
    names = [e["key_name"] for e in json.loads(as_json.stdout)]
    assert "y" * 128 in names
    assert any(name.startswith("evil") and "\u202e" not in name for name in names)


def test_connection_flags_work_before_the_subcommand(dev_server: DevServer) -> None:
    token = str(dev_server.token_file("admin"))
    done = subprocess.run(
        [
            *(sys.executable, "-m", "client.kmsctl", "--addr", dev_server.address),
            *("--token-file", token, "--json", "keys"),
        ],
        capture_output=True,
        cwd=REPO,
        env=child_environment(),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_every_program_has_version_and_completion() -> None:
    for module in ("client.kmsctl", "client.backup", "client.restore", "server.main"):
        version = subprocess.run(
            [sys.executable, "-m", module, "--version"],
            capture_output=True,
            cwd=REPO,
            env=child_environment(),
            timeout=60,
        )
        assert version.returncode == 0 and b"backup-kms" in version.stdout, module
        for shell in ("bash", "zsh"):
            script = subprocess.run(
                [sys.executable, "-m", module, "completion", shell],
                capture_output=True,
                cwd=REPO,
                env=child_environment(),
                timeout=60,
            )
            assert script.returncode == 0, (module, script.stderr)
            assert b"complete -o filenames -F" in script.stdout
            checked = subprocess.run(["bash", "-n"], input=script.stdout, capture_output=True)
            assert checked.returncode == 0, (module, shell, checked.stderr)
