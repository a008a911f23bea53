"""kms-backup and kms-restore through the real server: versions, shredding, tampering, roles."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from client import backup, restore
from client.archive import (
    DEFAULT_SEGMENT_SIZE,
    RECORD,
    TAG_SIZE,
    ArchiveHeader,
    ArchiveWriter,
    PayloadKind,
    read_header,
)
from client.kms_client import ClientConfig, KmsClient, KmsError
from tests.conftest import RunningKms
from tests.integration.conftest import Outcome, nothing_new_in, run_program, write_random_file

KEY = "tenant-a"
OLD_MTIME = 946_684_800  # 2000-01-01, far from "now" so a lost mtime shows
REPO = Path(__file__).resolve().parents[2]


def client_for(kms: RunningKms, role: str) -> KmsClient:
    return KmsClient(ClientConfig(addr=kms.address, token=kms.tokens[role], timeout=30))


def connection(kms: RunningKms, role: str) -> list[str]:
    return ["--addr", kms.address, "--token-file", str(kms.token_files[role])]


def make_backup(kms: RunningKms, source: Path | str, archive: Path) -> Outcome:
    argv = ["create", "--key", KEY, str(source), "-o", str(archive), *connection(kms, "backup")]
    outcome = run_program(backup.main, argv)
    assert outcome.exit_code == 0, outcome.stderr
    return outcome


def run_restore(kms: RunningKms, archive: Path, target: Path, role: str = "restore") -> Outcome:
    return run_program(restore.main, [str(archive), "-o", str(target), *connection(kms, role)])


def setup_key(kms: RunningKms) -> None:
    with client_for(kms, "admin") as admin:
        admin.register_key_version(KEY, activate=True)


def rotate_to_new_version(kms: RunningKms) -> int:
    with client_for(kms, "admin") as admin:
        version = admin.register_key_version(KEY).version
        admin.rotate_active(KEY, version, reason="test rotation")
    return version


def make_tree(root: Path) -> Path:
    """A small tree with a symlink, a non-default mode and old mtimes everywhere."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "top.txt").write_bytes(b"top level\n")
    (root / "sub" / "secret.key").write_bytes(os.urandom(300))
    (root / "sub" / "deeper" / "empty").write_bytes(b"")
    (root / "sub" / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "sub" / "secret.key", 0o600)
    os.chmod(root / "sub" / "script.sh", 0o750)
    os.chmod(root / "sub" / "deeper", 0o700)
    os.symlink("sub/secret.key", root / "link-to-secret")
    os.symlink("../top.txt", root / "sub" / "link-up")
    # Deepest first, so setting a child's time does not disturb its parent's afterwards.
    entries = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for offset, path in enumerate([*entries, root]):
        when = OLD_MTIME + offset * 3600
        os.utime(path, (when, when), follow_symlinks=False)
    return root


def describe_tree(root: Path) -> dict[str, tuple[str, int, int, bytes]]:
    """Every entry's kind, permission bits, mtime (ns) and content or link target."""
    result: dict[str, tuple[str, int, int, bytes]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            kind, content = "link", os.readlink(path).encode()
        elif stat.S_ISDIR(info.st_mode):
            kind, content = "dir", b""
        else:
            kind, content = "file", path.read_bytes()
        mode = stat.S_IMODE(info.st_mode) if kind != "link" else 0
        result[str(path.relative_to(root))] = (kind, mode, info.st_mtime_ns, content)
    return result


def header_of(archive: Path) -> ArchiveHeader:
    with open(archive, "rb") as stream:
        return read_header(stream).header


def test_restore_uses_the_backups_own_key_version_after_rotation(
    kms: RunningKms, tmp_path: Path
) -> None:
    setup_key(kms)
    file_a = tmp_path / "a.bin"
    write_random_file(file_a, 3 * DEFAULT_SEGMENT_SIZE + 12345)
    tree = make_tree(tmp_path / "tree")
    make_backup(kms, file_a, tmp_path / "a.kbk")
    make_backup(kms, tree, tmp_path / "tree.kbk")

    assert rotate_to_new_version(kms) == 2
    file_b = tmp_path / "b.bin"
    file_b.write_bytes(b"made after the rotation")
    make_backup(kms, file_b, tmp_path / "b.kbk")

    assert header_of(tmp_path / "a.kbk").key_version == 1
    assert header_of(tmp_path / "tree.kbk").key_version == 1
    assert header_of(tmp_path / "b.kbk").key_version == 2

    out = tmp_path / "out"
    out.mkdir()
    for name in ("a", "tree", "b"):
        outcome = run_restore(kms, tmp_path / f"{name}.kbk", out / name)
        assert outcome.exit_code == 0, outcome.stderr
    assert (out / "a").read_bytes() == file_a.read_bytes()
    assert (out / "b").read_bytes() == file_b.read_bytes()
    assert describe_tree(out / "tree") == describe_tree(tree)
    assert sorted(os.listdir(out)) == ["a", "b", "tree"]  # no temporaries left


def test_backup_prints_its_id_key_and_version_as_json(kms: RunningKms, tmp_path: Path) -> None:
    setup_key(kms)
    (tmp_path / "f").write_bytes(b"x")
    argv = ["create", "--key", KEY, str(tmp_path / "f"), "-o", str(tmp_path / "f.kbk"), "--json"]
    outcome = run_program(backup.main, [*argv, *connection(kms, "backup")])
    assert outcome.exit_code == 0, outcome.stderr
    summary = json.loads(outcome.stdout)
    assert summary["key"] == KEY
    assert summary["key_version"] == 1
    assert summary["backup_id"] == header_of(tmp_path / "f.kbk").backup_id
    uuid.UUID(summary["backup_id"])


def test_destroyed_key_version_makes_only_its_backups_unrestorable(
    kms: RunningKms, tmp_path: Path
) -> None:
    setup_key(kms)
    (tmp_path / "a.txt").write_bytes(b"bound to version 1")
    tree = make_tree(tmp_path / "tree")
    make_backup(kms, tmp_path / "a.txt", tmp_path / "a.kbk")
    make_backup(kms, tree, tmp_path / "tree.kbk")
    rotate_to_new_version(kms)
    (tmp_path / "b.txt").write_bytes(b"bound to version 2")
    make_backup(kms, tmp_path / "b.txt", tmp_path / "b.kbk")
    with client_for(kms, "admin") as admin:
        admin.destroy_key_version(KEY, 1, reason="crypto-shred test")

    out = tmp_path / "out"
    out.mkdir()
    with nothing_new_in(out):
        for name in ("a", "tree"):
            outcome = run_restore(kms, tmp_path / f"{name}.kbk", out / name)
            assert outcome.exit_code == 1
            assert "destroyed" in outcome.stderr
            assert "KEY_VERSION_DESTROYED" in outcome.stderr
    outcome = run_restore(kms, tmp_path / "b.kbk", out / "b")
    assert outcome.exit_code == 0, outcome.stderr
    assert (out / "b").read_bytes() == b"bound to version 2"


def test_disabled_key_version_blocks_restore_until_enabled(kms: RunningKms, tmp_path: Path) -> None:
    setup_key(kms)
    (tmp_path / "a.txt").write_bytes(b"bound to version 1")
    make_backup(kms, tmp_path / "a.txt", tmp_path / "a.kbk")
    rotate_to_new_version(kms)
    with client_for(kms, "admin") as admin:
        admin.disable_key_version(KEY, 1)

    out = tmp_path / "out"
    out.mkdir()
    with nothing_new_in(out):
        outcome = run_restore(kms, tmp_path / "a.kbk", out / "a")
    assert outcome.exit_code == 1
    assert "disabled" in outcome.stderr
    assert "KEY_VERSION_DISABLED" in outcome.stderr

    with client_for(kms, "admin") as admin:
        admin.enable_key_version(KEY, 1)
    outcome = run_restore(kms, tmp_path / "a.kbk", out / "a")
    assert outcome.exit_code == 0, outcome.stderr
    assert (out / "a").read_bytes() == b"bound to version 1"


# Each takes (archive bytes, another archive's bytes) and returns the damaged archive.
Tamper = Callable[[bytes, bytes], bytes]


def header_length(archive: bytes) -> int:
    return len(read_header(io.BytesIO(archive)).raw) + TAG_SIZE


def split(archive: bytes) -> tuple[bytes, list[bytes]]:
    """The header, then each segment record cut by its own length field."""
    start = header_length(archive)
    body, parts = archive[start:], []
    while body:
        _, stored, _ = RECORD.unpack_from(body)
        size = RECORD.size + stored + TAG_SIZE
        parts.append(body[:size])
        body = body[size:]
    return archive[:start], parts


def flip_bit_in_segment(archive: bytes, _other: bytes) -> bytes:
    header, parts = split(archive)
    damaged = bytearray(parts[1])
    damaged[1000] ^= 0x10
    parts[1] = bytes(damaged)
    return header + b"".join(parts)


def edit_header(archive: bytes, _other: bytes) -> bytes:
    damaged = bytearray(archive)
    damaged[20] ^= 0x01  # inside the creation time
    return bytes(damaged)


def truncate_at_boundary(archive: bytes, _other: bytes) -> bytes:
    header, parts = split(archive)
    return header + b"".join(parts[:2])


def truncate_mid_segment(archive: bytes, _other: bytes) -> bytes:
    return archive[:-100]


def drop_segment(archive: bytes, _other: bytes) -> bytes:
    header, parts = split(archive)
    return header + b"".join(parts[:1] + parts[2:])


def reorder_segments(archive: bytes, _other: bytes) -> bytes:
    header, parts = split(archive)
    return header + b"".join([parts[1], parts[0], *parts[2:]])


def duplicate_segment(archive: bytes, _other: bytes) -> bytes:
    header, parts = split(archive)
    return header + b"".join([*parts[:2], parts[1], *parts[2:]])


def append_data(archive: bytes, _other: bytes) -> bytes:
    return archive + b"appended"


def splice_from_other_archive(archive: bytes, other: bytes) -> bytes:
    header, parts = split(archive)
    parts[1] = split(other)[1][1]
    return header + b"".join(parts)


TAMPERINGS: dict[str, tuple[Tamper, str]] = {
    "bit-flip": (flip_bit_in_segment, "segment 1"),
    "header-edit": (edit_header, "header"),
    "truncated-at-boundary": (truncate_at_boundary, "truncated"),
    "truncated-mid-segment": (truncate_mid_segment, "truncated inside segment 3"),
    "dropped-segment": (drop_segment, "segment 1"),
    "reordered": (reorder_segments, "segment 0"),
    "duplicated": (duplicate_segment, "segment 2"),
    "appended": (append_data, "after the last segment"),
    "spliced": (splice_from_other_archive, "segment 1"),
}


@pytest.mark.parametrize("payload", ["file", "tree"])
@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_tampered_archive_is_refused_and_leaves_nothing_at_the_target(
    kms: RunningKms, tmp_path: Path, tampering: str, payload: str
) -> None:
    setup_key(kms)
    source = tmp_path / "source"
    if payload == "file":
        write_random_file(source, 3 * DEFAULT_SEGMENT_SIZE + 500)
    else:
        make_tree(source)
        write_random_file(source / "big.bin", 3 * DEFAULT_SEGMENT_SIZE + 500)
    write_random_file(tmp_path / "other", 3 * DEFAULT_SEGMENT_SIZE + 500)
    make_backup(kms, source, tmp_path / "good.kbk")
    make_backup(kms, tmp_path / "other", tmp_path / "other.kbk")
    tamper, expected = TAMPERINGS[tampering]
    damaged = tmp_path / "damaged.kbk"
    damaged.write_bytes(
        tamper((tmp_path / "good.kbk").read_bytes(), (tmp_path / "other.kbk").read_bytes())
    )

    out = tmp_path / "out"
    out.mkdir()
    with nothing_new_in(out):
        outcome = run_restore(kms, damaged, out / "restored")
        verified = run_program(
            restore.main, ["--verify", str(damaged), *connection(kms, "restore")]
        )
    assert outcome.exit_code == 1
    assert expected in outcome.stderr
    assert verified.exit_code == 1
    assert expected in verified.stderr


def test_restore_refuses_to_overwrite_without_force(kms: RunningKms, tmp_path: Path) -> None:
    setup_key(kms)
    (tmp_path / "a").write_bytes(b"new content")
    make_backup(kms, tmp_path / "a", tmp_path / "a.kbk")
    target = tmp_path / "existing"
    target.write_bytes(b"keep me")

    outcome = run_restore(kms, tmp_path / "a.kbk", target)
    assert outcome.exit_code == 1
    assert "already exists" in outcome.stderr
    assert target.read_bytes() == b"keep me"

    argv = [str(tmp_path / "a.kbk"), "-o", str(target), "--force", *connection(kms, "restore")]
    assert run_program(restore.main, argv).exit_code == 0
    assert target.read_bytes() == b"new content"


def test_force_replaces_an_existing_tree(kms: RunningKms, tmp_path: Path) -> None:
    setup_key(kms)
    tree = make_tree(tmp_path / "tree")
    make_backup(kms, tree, tmp_path / "tree.kbk")
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale").write_text("gone after restore")

    argv = [str(tmp_path / "tree.kbk"), "-o", str(target), "--force", *connection(kms, "restore")]
    outcome = run_program(restore.main, argv)
    assert outcome.exit_code == 0, outcome.stderr
    assert describe_tree(target) == describe_tree(tree)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kms", "out", "tree", "tree.kbk"]


def test_unknown_backup_is_reported_and_nothing_restored(kms: RunningKms, tmp_path: Path) -> None:
    setup_key(kms)
    forged = tmp_path / "forged.kbk"
    header = ArchiveHeader(
        backup_id=str(uuid.uuid4()),
        key_name=KEY,
        key_version=1,
        wrapped_data_key=os.urandom(60),
        payload_kind=PayloadKind.FILE,
    )
    with open(forged, "wb") as out, ArchiveWriter(out, header, os.urandom(32)) as writer:
        writer.write(b"never issued by the server")

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with nothing_new_in(out_dir):
        outcome = run_restore(kms, forged, out_dir / "x")
    assert outcome.exit_code == 1
    assert header.backup_id in outcome.stderr


def test_backup_role_cannot_resolve_keys(kms: RunningKms, tmp_path: Path) -> None:
    setup_key(kms)
    (tmp_path / "a").write_bytes(b"data")
    make_backup(kms, tmp_path / "a", tmp_path / "a.kbk")
    backup_id = header_of(tmp_path / "a.kbk").backup_id

    with client_for(kms, "backup") as client, pytest.raises(KmsError) as caught:
        client.resolve_key_for_backup(backup_id)
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.reason == "PERMISSION_DENIED"

    out = tmp_path / "out"
    out.mkdir()
    with nothing_new_in(out):
        outcome = run_restore(kms, tmp_path / "a.kbk", out / "a", role="backup")
    assert outcome.exit_code == 1
    assert "PERMISSION_DENIED" in outcome.stderr
    assert kms.tokens["backup"] not in outcome.stderr


def test_restore_role_cannot_get_active_keys(kms: RunningKms, tmp_path: Path) -> None:
    setup_key(kms)
    with client_for(kms, "restore") as client, pytest.raises(KmsError) as caught:
        client.get_active_key(KEY, str(uuid.uuid4()))
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.reason == "PERMISSION_DENIED"

    (tmp_path / "a").write_bytes(b"data")
    argv = ["create", "--key", KEY, str(tmp_path / "a"), "-o", str(tmp_path / "a.kbk")]
    outcome = run_program(backup.main, [*argv, *connection(kms, "restore")])
    assert outcome.exit_code == 1
    assert "PERMISSION_DENIED" in outcome.stderr
    assert not (tmp_path / "a.kbk").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "kms"]


def test_wrong_token_is_reported_as_unauthenticated(kms: RunningKms, tmp_path: Path) -> None:
    setup_key(kms)
    (tmp_path / "a").write_bytes(b"data")
    make_backup(kms, tmp_path / "a", tmp_path / "a.kbk")
    (tmp_path / "bad-token").write_text("not-a-real-token\n")
    argv = [str(tmp_path / "a.kbk"), "-o", str(tmp_path / "restored")]
    argv += ["--addr", kms.address, "--token-file", str(tmp_path / "bad-token")]
    outcome = run_program(restore.main, argv)
    assert outcome.exit_code == 1
    assert "UNAUTHENTICATED" in outcome.stderr
    assert not (tmp_path / "restored").exists()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def peak_rss_of_child(argv: list[str]) -> tuple[int, int, str]:
    """Run a child to completion; returns its exit code, its own peak RSS in bytes, stderr.

    Through the benchmark's small launcher: a child forked straight from pytest
    would count pytest's own resident memory in its ru_maxrss.
    """
    launcher = [sys.executable, "-S", "-m", "benchmarks.rusage"]
    done = subprocess.run([*launcher, *argv], cwd=REPO, capture_output=True, check=True)
    usage = json.loads(done.stdout)
    return usage["returncode"], usage["max_rss_kib"] * 1024, done.stderr.decode()


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units and wait4 are Linux's")
def test_256_mib_backup_and_restore_keep_memory_flat(kms: RunningKms, tmp_path: Path) -> None:
    setup_key(kms)
    size = 256 << 20
    limit = 128 << 20
    source = tmp_path / "big.bin"
    write_random_file(source, size)
    archive = tmp_path / "big.kbk"
    restored = tmp_path / "restored.bin"

    backup_argv = ["create", "--key", KEY, str(source), "-o", str(archive)]
    code, backup_rss, stderr = peak_rss_of_child(
        [sys.executable, "-m", "client.backup", *backup_argv, *connection(kms, "backup")]
    )
    assert code == 0, stderr
    restore_argv = [str(archive), "-o", str(restored)]
    code, restore_rss, stderr = peak_rss_of_child(
        [sys.executable, "-m", "client.restore", *restore_argv, *connection(kms, "restore")]
    )
    assert code == 0, stderr

    assert backup_rss < limit, f"kms-backup peaked at {backup_rss >> 20} MiB"
    assert restore_rss < limit, f"kms-restore peaked at {restore_rss >> 20} MiB"
    assert restored.stat().st_size == size
    assert sha256_of(restored) == sha256_of(source)
