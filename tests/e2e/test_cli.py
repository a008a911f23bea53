"""kmsctl, kms-backup and kms-restore driven as a user would, against `kms-server --dev`."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from client.kms_client import ClientConfig, KmsClient
from tests.e2e.conftest import DevServer

KEY = "payroll"


def register_and_activate(server: DevServer) -> None:
    done = server.run("kmsctl", "register", KEY, "--activate", "--json", role="admin", check=True)
    [version] = json.loads(done.stdout)
    assert version["version"] == 1
    assert version["active"] is True
    assert version["state"] == "KEY_VERSION_STATE_ENABLED"


def back_up(server: DevServer, source: Path, archive: Path) -> None:
    server.run("backup", "create", "--key", KEY, str(source), "-o", str(archive), role="backup",
               check=True)  # fmt: skip


def test_file_backup_and_restore_with_json_summaries(dev_server: DevServer, tmp_path: Path) -> None:
    register_and_activate(dev_server)
    source = tmp_path / "ledger.csv"
    source.write_bytes(os.urandom(3 << 20) + b"tail")
    archive = tmp_path / "ledger.kbk"

    made = dev_server.run(
        "backup", "create", "--key", KEY, str(source), "-o", str(archive), "--json",
        role="backup", check=True,
    )  # fmt: skip
    summary = json.loads(made.stdout)
    assert (summary["key"], summary["key_version"], summary["payload"]) == (KEY, 1, "file")

    restored = tmp_path / "restored.csv"
    done = dev_server.run(
        "restore", str(archive), "-o", str(restored), "--json", role="restore", check=True
    )
    assert json.loads(done.stdout)["backup_id"] == summary["backup_id"]
    assert restored.read_bytes() == source.read_bytes()

    verified = dev_server.run("restore", "--verify", str(archive), role="restore", check=True)
    assert b"verified" in verified.stdout

    keys = json.loads(dev_server.run("kmsctl", "keys", "--json", role="admin", check=True).stdout)
    assert [(k["name"], k["active_version"]) for k in keys] == [(KEY, 1)]


def test_stdin_backup_to_stdout_and_back(dev_server: DevServer, tmp_path: Path) -> None:
    register_and_activate(dev_server)
    payload = os.urandom((2 << 20) + 77)

    made = dev_server.run(
        "backup", "create", "--key", KEY, "-", "-o", "-", "--json", role="backup", stdin=payload,
        check=True,
    )  # fmt: skip
    archive = made.stdout
    summary = json.loads(made.stderr)  # the summary moves to stderr when stdout is the archive
    assert summary["payload"] == "stream"
    assert summary["bytes"] == len(payload)
    assert payload not in archive

    done = dev_server.run("restore", "-", "-o", "-", role="restore", stdin=archive, check=True)
    assert done.stdout == payload

    damaged = bytearray(archive)
    damaged[len(damaged) // 2] ^= 0x01
    failed = dev_server.run("restore", "-", "-o", "-", role="restore", stdin=bytes(damaged))
    assert failed.returncode == 1
    assert failed.stdout == b""  # nothing unverified reaches stdout
    assert b"failed authentication" in failed.stderr


def test_directory_tree_round_trip_through_the_programs(
    dev_server: DevServer, tmp_path: Path
) -> None:
    register_and_activate(dev_server)
    tree = tmp_path / "site"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "app.conf").write_text("port = 8080\n")
    os.chmod(tree / "etc" / "app.conf", 0o640)
    os.symlink("etc/app.conf", tree / "current.conf")
    os.utime(tree / "etc" / "app.conf", (1_000_000_000, 1_000_000_000))
    archive = tmp_path / "site.kbk"
    dev_server.run(
        "backup", "create", "--key", KEY, str(tree), "-o", str(archive), role="backup", check=True
    )
    target = tmp_path / "restored-site"
    dev_server.run("restore", str(archive), "-o", str(target), role="restore", check=True)

    restored_conf = target / "etc" / "app.conf"
    assert restored_conf.read_text() == "port = 8080\n"
    assert restored_conf.stat().st_mode & 0o777 == 0o640
    assert restored_conf.stat().st_mtime == 1_000_000_000
    assert os.readlink(target / "current.conf") == "etc/app.conf"

    again = dev_server.run("restore", str(archive), "-o", str(target), role="restore")
    assert again.returncode == 1
    assert b"already exists" in again.stderr


def test_rotation_then_destroy_keeps_new_backups_restorable(
    dev_server: DevServer, tmp_path: Path
) -> None:
    register_and_activate(dev_server)
    (tmp_path / "old.txt").write_text("made under version 1")
    back_up(dev_server, tmp_path / "old.txt", tmp_path / "old.kbk")

    dev_server.run("kmsctl", "register", KEY, role="admin", check=True)
    stale = dev_server.run("kmsctl", "rotate", KEY, "2", "--expect", "0", role="admin")
    assert stale.returncode == 1
    assert b"ABORTED" in stale.stderr
    rotated = dev_server.run(
        "kmsctl", "rotate", KEY, "2", "--expect", "1", "--reason", "yearly", "--json",
        role="admin", check=True,
    )  # fmt: skip
    assert json.loads(rotated.stdout)["to_version"] == 2

    (tmp_path / "new.txt").write_text("made under version 2")
    back_up(dev_server, tmp_path / "new.txt", tmp_path / "new.kbk")

    # No terminal and no --yes: refuse, and destroy nothing.
    refused = dev_server.run("kmsctl", "destroy", KEY, "1", role="admin")
    assert refused.returncode != 0
    assert b"--yes" in refused.stderr
    dev_server.run(
        "kmsctl", "destroy", KEY, "1", "--yes", "--reason", "test", role="admin", check=True
    )

    versions = json.loads(
        dev_server.run("kmsctl", "versions", KEY, "--json", role="admin", check=True).stdout
    )
    assert [(v["version"], v["state"], v["active"]) for v in versions] == [
        (1, "KEY_VERSION_STATE_DESTROYED", False),
        (2, "KEY_VERSION_STATE_ENABLED", True),
    ]
    table = dev_server.run("kmsctl", "versions", KEY, role="admin", check=True).stdout.decode()
    assert "destroyed" in table

    lost = dev_server.run(
        "restore", str(tmp_path / "old.kbk"), "-o", str(tmp_path / "old.out"), role="restore"
    )
    assert lost.returncode == 1
    assert b"destroyed" in lost.stderr
    assert not (tmp_path / "old.out").exists()
    dev_server.run(
        "restore", str(tmp_path / "new.kbk"), "-o", str(tmp_path / "new.out"), role="restore",
        check=True,
    )  # fmt: skip
    assert (tmp_path / "new.out").read_text() == "made under version 2"


def test_audit_list_follows_pages_and_verify_reports_an_intact_chain(
    dev_server: DevServer,
) -> None:
    register_and_activate(dev_server)
    token = dev_server.token_file("admin").read_text().strip()
    # More events than one default page (100), made cheaply in-process.
    with KmsClient(ClientConfig(addr=dev_server.address, token=token)) as admin:
        for _ in range(120):
            admin.get_key_version(KEY, 1)

    listed = dev_server.run(
        "kmsctl", "audit", "list", "--limit", "1000", "--json", role="auditor", check=True
    )
    events = json.loads(listed.stdout)
    assert len(events) >= 121
    # Newest first, every one of them, sequence numbers as JSON numbers.
    assert [e["sequence"] for e in events] == list(range(len(events), 0, -1))

    default = json.loads(
        dev_server.run("kmsctl", "audit", "list", "--json", role="auditor", check=True).stdout
    )
    assert [e["sequence"] for e in default] == list(range(len(events) + 1, len(events) - 49, -1))
    since = json.loads(
        dev_server.run(
            "kmsctl", "--json", "audit", "list", "--since", "118", role="auditor", check=True
        ).stdout
    )
    assert [e["sequence"] for e in since] == list(range(len(events) + 2, 118, -1))

    limited = dev_server.run(
        "kmsctl", "audit", "list", "--limit", "5", "--key", KEY, "--json", role="auditor",
        check=True,
    )  # fmt: skip
    assert len(json.loads(limited.stdout)) == 5

    verified = dev_server.run("kmsctl", "audit", "verify", role="auditor", check=True)
    assert b"intact" in verified.stdout
    as_json = dev_server.run("kmsctl", "audit", "verify", "--json", role="auditor", check=True)
    assert json.loads(as_json.stdout)["intact"] is True


def test_errors_name_the_status_and_exit_codes_distinguish_usage(dev_server: DevServer) -> None:
    missing = dev_server.run("kmsctl", "versions", "no-such-key", role="admin")
    assert missing.returncode == 1
    assert b"NOT_FOUND" in missing.stderr

    denied = dev_server.run("kmsctl", "keys", role="backup")
    assert denied.returncode == 1
    assert b"PERMISSION_DENIED" in denied.stderr

    anonymous = dev_server.run("kmsctl", "keys")
    assert anonymous.returncode == 1
    assert b"UNAUTHENTICATED" in anonymous.stderr

    usage = dev_server.run("kmsctl", "rotate", KEY, role="admin")
    assert usage.returncode == 2

    for role in ("admin", "backup", "restore", "auditor"):
        token = dev_server.token_file(role).read_text().strip().encode()
        for completed in (missing, denied, anonymous, usage):
            assert token not in completed.stderr + completed.stdout


def test_unreachable_server_is_reported(dev_server: DevServer, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    archive = tmp_path / "x.kbk"
    (tmp_path / "f").write_text("data")
    failed = dev_server.run(
        "backup", "create", "--key", KEY, str(tmp_path / "f"), "-o", str(archive),
        "--retries", "1", "--timeout", "2", role="backup", addr=closed,
    )  # fmt: skip
    assert failed.returncode == 1
    assert b"UNAVAILABLE" in failed.stderr
    assert not archive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "kms-data", "ready", "server.log"]
