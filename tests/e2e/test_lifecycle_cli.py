"""The key lifecycle through the CLIs, against a real `kms-server --dev`: back up, schedule a
destruction (the restore is refused naming the due date), cancel, retire by rewrap, destroy
for real, and the old archive still restores."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.e2e.conftest import DevServer, running_dev_server

KEY = "payroll"


def _versions(server: DevServer) -> dict[int, dict[str, object]]:
    listed = server.run("kmsctl", "versions", KEY, "--json", role="admin", check=True)
    return {int(v["version"]): v for v in json.loads(listed.stdout)}


def _restore(server: DevServer, archive: Path, target: Path) -> tuple[int, str]:
    target.unlink(missing_ok=True)
    done = server.run("restore", str(archive), "-o", str(target), role="restore")
    return done.returncode, done.stderr.decode()


def test_schedule_cancel_retire_destroy_and_the_old_archive_still_restores(
    tmp_path: Path,
) -> None:
    source, archive, restored = tmp_path / "old.txt", tmp_path / "old.kbk", tmp_path / "out.txt"
    source.write_text("made under version 1")
    with running_dev_server(tmp_path, "--destroy-delay", "1h") as server:
        server.run("kmsctl", "register", KEY, "--activate", role="admin", check=True)
        server.run("backup", "create", "--key", KEY, str(source), "-o", str(archive),
                   role="backup", check=True)  # fmt: skip
        server.run("kmsctl", "register", KEY, role="admin", check=True)
        server.run("kmsctl", "rotate", KEY, "2", role="admin", check=True)

        # 1. Scheduled: the restore is refused and names the due date.
        scheduled = server.run("kmsctl", "destroy", KEY, "1", "--yes", role="admin", check=True)
        assert f"destroying {KEY} version 1 makes 1 backup unrestorable on " in (
            scheduled.stderr.decode()
        )
        version_1 = _versions(server)[1]
        assert version_1["state"] == "KEY_VERSION_STATE_DESTROY_SCHEDULED"
        due_day = str(version_1["destroy_time"])[:10]
        code, message = _restore(server, archive, restored)
        assert code == 1 and "KEY_VERSION_DESTROY_SCHEDULED" in message
        assert due_day in message and "cancel-destroy" in message

        # 2. Cancelled, then enabled: the restore works.
        server.run("kmsctl", "cancel-destroy", KEY, "1", role="admin", check=True)
        assert _versions(server)[1]["state"] == "KEY_VERSION_STATE_DISABLED"
        server.run("kmsctl", "enable", KEY, "1", role="admin", check=True)
        assert _restore(server, archive, restored)[0] == 0
        assert restored.read_text() == "made under version 1"

        # 3. Retired: no backup depends on version 1 any more.
        server.run("kmsctl", "retire", KEY, "1", role="admin", check=True)
        counted = server.run("kmsctl", "backups", KEY, "--version", "1", role="admin", check=True)
        assert counted.stdout.decode().startswith(f"0 backups bound to {KEY} version 1")
        assert _versions(server)[2]["backup_count"] == 1

    # 4. Destroyed with a short delay: after it, the old archive still restores.
    with running_dev_server(tmp_path, "--destroy-delay", "2s") as server:
        destroyed = server.run("kmsctl", "destroy", KEY, "1", "--yes", role="admin", check=True)
        assert "makes 0 backups unrestorable" in destroyed.stderr.decode()
        deadline = time.monotonic() + 30
        while _versions(server)[1]["state"] != "KEY_VERSION_STATE_DESTROYED":
            assert time.monotonic() < deadline, "the destruction was not carried out"
            time.sleep(0.2)
        code, message = _restore(server, archive, restored)
        assert code == 0, message
        assert restored.read_text() == "made under version 1"
        audit = server.run("kmsctl", "audit", "list", "--key", KEY, "--json", role="auditor",
                           check=True)  # fmt: skip
        actions = [(e["actor"], e["action"]) for e in json.loads(audit.stdout)]
        assert ("system:scheduler", "key_version.destroy") in actions
        assert ("dev-admin", "backup.rewrap") in actions
        server.run("kmsctl", "audit", "verify", role="auditor", check=True)
