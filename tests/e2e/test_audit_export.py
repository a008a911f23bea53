"""Signed checkpoints and exports, verified offline by a process that imports nothing from
server/: as an auditor who keeps checkpoints outside the KMS would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms_audit import checkpoint as checkpoints
from tests.conftest import REPO, child_environment
from tests.e2e.conftest import DevServer

# Runs kmsctl's verify-export, then fails if anything of the server was imported.
_OFFLINE = """
import sys
from client import kmsctl
code = kmsctl.main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m == "server" or m.startswith("server."))
if leaked:
    print("imported server modules:", leaked, file=sys.stderr)
    sys.exit(99)
sys.exit(code)
"""


def verify_offline(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _OFFLINE, "audit", "verify-export", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_environment(),
        timeout=60,
    )


def _activity(dev_server: DevServer, key: str) -> None:
    dev_server.run("kmsctl", "register", key, "--activate", role="admin", check=True)
    dev_server.run("kmsctl", "register", key, role="admin", check=True)
    dev_server.run("kmsctl", "rotate", key, "2", "--reason", "test", role="admin", check=True)


def _setup(dev_server: DevServer, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Activity, a kept checkpoint, more activity, then the public key and an export."""
    _activity(dev_server, "alpha")
    kept = tmp_path / "kept.json"
    dev_server.run("kmsctl", "audit", "checkpoint", "-o", str(kept), role="auditor", check=True)
    _activity(dev_server, "beta")
    public = dev_server.run("kmsctl", "audit", "public-key", role="auditor", check=True)
    pem = tmp_path / "audit.pem"
    pem.write_bytes(public.stdout)
    export = tmp_path / "audit.jsonl"
    dev_server.run("kmsctl", "audit", "export", "-o", str(export), role="auditor", check=True)
    return pem, kept, export


def test_an_export_verifies_offline_and_extends_a_kept_checkpoint(
    dev_server: DevServer, tmp_path: Path
) -> None:
    pem, kept, export = _setup(dev_server, tmp_path)
    assert pem.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    result = verify_offline(export, "--public-key", pem, "--checkpoint", kept)
    assert result.returncode == 0, result.stderr
    kept_sequence = json.loads(kept.read_text())["sequence"]
    assert f"extends the kept checkpoint of event {kept_sequence}" in result.stdout
    lines = export.read_text().splitlines()
    assert json.loads(lines[0])["sequence"] == 1
    assert all(json.loads(line).get("mac") for line in lines[:-1])  # every event is keyed
    # --since: a later part alone still verifies against the same kept checkpoint.
    part = tmp_path / "part.jsonl"
    dev_server.run(
        "kmsctl", "audit", "export", "--since", str(kept_sequence), "-o", str(part),
        role="auditor", check=True,
    )  # fmt: skip
    assert verify_offline(part, "--public-key", pem, "--checkpoint", kept).returncode == 0


def test_a_truncated_export_is_refused(dev_server: DevServer, tmp_path: Path) -> None:
    pem, _, export = _setup(dev_server, tmp_path)
    lines = export.read_text().splitlines()
    export.write_text("\n".join(lines[:-2]) + "\n")
    result = verify_offline(export, "--public-key", pem)
    assert result.returncode == 1
    assert "does not end with a signed checkpoint" in result.stdout


def test_an_edited_line_is_refused(dev_server: DevServer, tmp_path: Path) -> None:
    pem, _, export = _setup(dev_server, tmp_path)
    lines = export.read_text().splitlines()
    event = json.loads(lines[2])
    event["actor"] = "someone-else"
    lines[2] = json.dumps(event)
    export.write_text("\n".join(lines) + "\n")
    result = verify_offline(export, "--public-key", pem)
    assert result.returncode == 1
    assert f"event {event['sequence']} does not match its hash" in result.stdout


def test_a_wrong_public_key_is_refused(dev_server: DevServer, tmp_path: Path) -> None:
    _, _, export = _setup(dev_server, tmp_path)
    other = tmp_path / "other.pem"
    other.write_text(checkpoints.public_key_pem(Ed25519PrivateKey.generate().public_key()))
    result = verify_offline(export, "--public-key", other)
    assert result.returncode == 1
    assert "not by the public key given" in result.stdout


def test_a_checkpoint_from_another_server_is_refused(dev_server: DevServer, tmp_path: Path) -> None:
    pem, kept, export = _setup(dev_server, tmp_path)
    original = checkpoints.Checkpoint.from_json(json.loads(kept.read_text()))
    foreign = checkpoints.sign(
        Ed25519PrivateKey.generate(), original.sequence, original.chain_hash, original.time_us
    )
    kept.write_text(json.dumps(foreign.to_json()))
    result = verify_offline(export, "--public-key", pem, "--checkpoint", kept)
    assert result.returncode == 1
    assert "comes from another server" in result.stdout


def test_a_log_that_no_longer_reaches_a_kept_checkpoint_is_refused(
    dev_server: DevServer, tmp_path: Path
) -> None:
    """The auditor's checkpoint is newer than what the log (the export) now shows."""
    _activity(dev_server, "alpha")
    export = tmp_path / "audit.jsonl"
    dev_server.run("kmsctl", "audit", "export", "-o", str(export), role="auditor", check=True)
    _activity(dev_server, "beta")
    kept = tmp_path / "kept.json"
    dev_server.run("kmsctl", "audit", "checkpoint", "-o", str(kept), role="auditor", check=True)
    pem = tmp_path / "audit.pem"
    pem.write_bytes(dev_server.run("kmsctl", "audit", "public-key", role="auditor").stdout)
    result = verify_offline(export, "--public-key", pem, "--checkpoint", kept)
    assert result.returncode == 1
    assert "truncated or rolled back" in result.stdout


def test_verify_export_names_a_bad_argument_without_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    result = verify_offline(tmp_path / "none.jsonl", "--public-key", missing)
    assert result.returncode == 2
    assert "--public-key" in result.stderr and "Traceback" not in result.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\xff\x00not a key")
    result = verify_offline(tmp_path / "none.jsonl", "--public-key", garbage)
    assert result.returncode == 2 and "not a PEM public key" in result.stderr
