"""A policy reload never weakens or kills: every bad file keeps the policy in force.

In process (`KmsServer.reload`, what SIGHUP calls) for each way a file can be bad, and as
real processes under --processes, where one uncaught error would end every worker.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kms.v1 import kms_pb2
from server.policy import hash_token
from tests.conftest import RunningKms, child_environment
from tests.integration.cluster import Replica, Secrets, wait_for
from tests.integration.kms_helpers import code_of, register

NEW_TOKEN = "a-token-only-the-new-policy-knows-0123456789"


def _valid_extra(name: str = "extra") -> str:
    return (
        f'\n[principals.{name}]\nauth = ["token"]\ntoken_sha256 = ["{hash_token(NEW_TOKEN)}"]\n'
        f'[[principals.{name}.grants]]\nroles = ["admin"]\nkeys = ["*"]\n'
    )


def _replace(policy_file: Path, text: str) -> None:
    """Atomically, as the README says: write a new file, then rename it over the old one."""
    scratch = policy_file.with_suffix(".new")
    scratch.write_text(text)
    os.replace(scratch, policy_file)


def _unreadable_directory(path: Path, original: str) -> None:
    path.unlink()
    path.mkdir()


def _dangling_symlink(path: Path, original: str) -> None:
    path.unlink()
    path.symlink_to(path.parent / "nowhere.toml")


def _not_utf8(path: Path, original: str) -> None:
    path.write_bytes(original.encode() + b"\n# \xff\xfe\n")


def _half_written_grant(path: Path, original: str) -> None:
    """What a writer that has not finished leaves: cut before the new grant's keys."""
    extra = _valid_extra("late")
    path.write_text(original + extra[: extra.index("keys =")])


def _replacing(text: Callable[[str], str]) -> Callable[[Path, str], None]:
    return lambda path, original: _replace(path, text(original))


# What each bad file does to the policy file (given the original text).
BAD_FILES: dict[str, Callable[[Path, str], None]] = {
    "roles-is-a-number": _replacing(
        lambda original: (
            original + '\n[principals.x]\nauth = ["certificate"]\n'
            '[[principals.x.grants]]\nroles = 5\nkeys = ["*"]\n'
        )
    ),
    "principals-is-a-number": _replacing(lambda original: "principals = 5\n"),
    "grants-hold-numbers": _replacing(
        lambda original: original + '\n[principals.x]\nauth = ["certificate"]\ngrants = [1, 2]\n'
    ),
    "old-shape-roles": _replacing(
        lambda original: original + '\n[principals.x]\nroles = ["admin"]\n'
    ),
    "empty": _replacing(lambda original: ""),
    "zero-principals": _replacing(lambda original: "[principals]\n"),
    "unreadable-directory": _unreadable_directory,
    "missing": lambda path, original: path.unlink(),
    "dangling-symlink": _dangling_symlink,
    "not-utf8": _not_utf8,
    "not-toml": _replacing(lambda original: original + "\n[principals.broken\n"),
    "half-written-grant": _half_written_grant,
}


def _serving(kms: RunningKms) -> int:
    with grpc.insecure_channel(kms.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return int(reply.status)


def _restore_file(path: Path, original: str) -> None:
    if path.is_dir():
        path.rmdir()
    elif path.is_symlink() or path.exists():
        path.unlink()
    path.write_text(original)


@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_a_bad_policy_file_keeps_the_policy_in_force(
    kms: RunningKms, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    policy_file = kms.settings.policy_file
    original = policy_file.read_text()
    # A policy with one more principal is in force first, so "kept" is visible.
    _replace(policy_file, original + _valid_extra())
    assert kms.server.reload()
    admin = kms.stub("admin")
    register(admin, activate=True)
    BAD_FILES[bad](policy_file, original + _valid_extra())
    with caplog.at_level(logging.ERROR):
        assert not kms.server.reload()
    reasons = [r.getMessage() for r in caplog.records if r.name == "server.reload"]
    assert reasons and all("previous policy stays in force" in m for m in reasons), reasons
    assert not [r for r in caplog.records if r.exc_info], "a known failure is no traceback"
    # Everyone still gets in exactly as before, and the server says SERVING.
    assert admin.ListKeys(kms_pb2.ListKeysRequest()).keys
    extra = kms.stub(None)
    metadata = (("authorization", f"Bearer {NEW_TOKEN}"),)
    assert extra.ListKeys(kms_pb2.ListKeysRequest(), metadata=metadata).keys
    assert (
        kms.stub("backup")
        .GetActiveKey(kms_pb2.GetActiveKeyRequest(key_name="tenant-a", backup_id=f"after-{bad}"))
        .data_key
    )
    assert _serving(kms) == health_pb2.HealthCheckResponse.SERVING
    # And a good file afterwards is loaded again.
    _restore_file(policy_file, original)
    assert kms.server.reload()
    with pytest.raises(grpc.RpcError) as caught:
        extra.ListKeys(kms_pb2.ListKeysRequest(), metadata=metadata)
    assert code_of(caught.value) == grpc.StatusCode.UNAUTHENTICATED


def test_every_worker_keeps_its_policy_and_lives_through_a_bad_sighup(tmp_path: Path) -> None:
    secrets = Secrets.create(tmp_path / "secrets")
    server = Replica(
        "supervised",
        f"sqlite+pysqlite:///{tmp_path / 'kms.sqlite3'}",
        secrets,
        tmp_path / "server",
        extra_args=["--processes", "2"],
    )
    server.start()
    try:
        assert server.process is not None
        workers = _children(server.process.pid)
        assert len(workers) == 2
        original = secrets.policy_file.read_text()
        log = tmp_path / "server" / "server.log"
        for round_, bad in enumerate(("roles-is-a-number", "empty", "zero-principals"), start=1):
            BAD_FILES[bad](secrets.policy_file, original)
            server.process.send_signal(signal.SIGHUP)
            wait_for(
                functools.partial(_refusals_at_least, log, 2 * round_),
                15,
                f"both workers refuse the {bad} policy",
            )
            assert server.process.poll() is None, server.log()
            assert _children(server.process.pid) == workers, "no worker died"
            # New connections, spread over both workers, still get in with the old policy.
            for _ in range(8):
                server.close_channels()
                server.stub("admin").ListKeys(kms_pb2.ListKeysRequest(), timeout=10)
            assert server.health("") == "SERVING"
        _replace(secrets.policy_file, original)
    finally:
        server.close_channels()
        server.stop()


def _refusals_at_least(log: Path, count: int) -> bool:
    return log.read_text().count("previous policy stays in force") >= count


def _children(pid: int) -> set[int]:
    """The supervisor's kms-server processes (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def test_a_grant_without_keys_stops_the_server_at_start_saying_what_to_add(
    tmp_path: Path,
) -> None:
    secrets = Secrets.create(tmp_path / "secrets")
    secrets.policy_file.write_text(
        '[principals.ops]\nauth = ["certificate"]\n[[principals.ops.grants]]\nroles = ["admin"]\n'
    )
    (tmp_path / "server").mkdir(mode=0o700)  # outside dev mode the data directory must exist
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.main",
            "--data-dir",
            str(tmp_path / "server"),
            "--root-key-file",
            str(secrets.root_key_file),
            "--policy-file",
            str(secrets.policy_file),
            "--insecure",
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        env=child_environment(),
    )
    assert done.returncode == 2
    assert "grant 1: add keys = [" in done.stderr and 'keys = ["*"] for every key' in done.stderr
