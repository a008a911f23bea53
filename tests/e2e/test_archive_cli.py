"""kms-backup and kms-restore as a user runs them: every way the old programs lost data."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from client.archive import ArchiveHeader, ArchiveWriter, Compression, PayloadKind, read_header
from client.archive import tree as tree_format
from client.kms_client import ClientConfig, KmsClient
from tests.conftest import REPO, child_environment
from tests.e2e.conftest import DevServer
from tests.tree_checker import assert_same_tree, describe, make_full_tree

KEY = "payroll"
IS_ROOT = os.geteuid() == 0


@pytest.fixture
def server(dev_server: DevServer) -> DevServer:
    dev_server.run("kmsctl", "register", KEY, "--activate", role="admin", check=True)
    return dev_server


def backup(
    server: DevServer, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return server.run("backup", "create", "--key", KEY, *args, role="backup", stdin=stdin)


def restore(
    server: DevServer, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return server.run("restore", *args, role="restore", stdin=stdin)


def ok(done: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    return done


def command(server: DevServer, module: str, role: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"client.{module}", *args, "--addr", server.address,
            "--token-file", str(server.token_file(role))]  # fmt: skip


def test_a_tree_with_one_of_everything_round_trips(server: DevServer, tmp_path: Path) -> None:
    make_full_tree(tmp_path / "src", special=True)
    archive = tmp_path / "tree.kms"
    ok(backup(server, str(tmp_path / "src"), "-o", str(archive), "--special-files"))
    ok(restore(server, str(archive), "-o", str(tmp_path / "out"), "--special-files"))
    assert_same_tree(tmp_path / "src", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == sorted(["src", "tree.kms", "out", "kms-data",
                                                    "ready", "server.log"])  # fmt: skip


def test_a_symlink_to_a_directory_as_source_backs_up_the_directory(
    server: DevServer, tmp_path: Path
) -> None:
    make_full_tree(tmp_path / "src")
    os.symlink("src", tmp_path / "dirlink")
    ok(backup(server, str(tmp_path / "dirlink"), "-o", str(tmp_path / "d.kms")))
    ok(restore(server, str(tmp_path / "d.kms"), "-o", str(tmp_path / "out")))
    assert_same_tree(tmp_path / "src", tmp_path / "out")


def test_symlinks_pointing_anywhere_restore_as_symlinks(server: DevServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("/etc/hostname", src / "abs")
    os.symlink("../x", src / "up")
    (tmp_path / "x").write_text("outside the tree")
    ok(backup(server, str(src), "-o", str(tmp_path / "t.kms")))
    ok(restore(server, str(tmp_path / "t.kms"), "-o", str(tmp_path / "out")))
    assert os.readlink(tmp_path / "out" / "abs") == "/etc/hostname"
    assert os.readlink(tmp_path / "out" / "up") == "../x"
    assert (tmp_path / "x").read_text() == "outside the tree"


def test_special_files_are_skipped_with_a_warning_unless_asked_for(
    server: DevServer, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "fifo")
    done = ok(backup(server, str(src), "-o", str(tmp_path / "t.kms")))
    assert done.stderr.count(b"warning: skipping") == 1
    ok(restore(server, str(tmp_path / "t.kms"), "-o", str(tmp_path / "out")))
    assert os.listdir(tmp_path / "out") == []
    ok(backup(server, str(src), "-o", str(tmp_path / "s.kms"), "--special-files"))
    skipped = ok(restore(server, str(tmp_path / "s.kms"), "-o", str(tmp_path / "out2")))
    assert b"warning: skipping fifo" in skipped.stderr
    assert os.listdir(tmp_path / "out2") == []
    ok(restore(server, str(tmp_path / "s.kms"), "-o", str(tmp_path / "out3"), "--special-files"))
    assert stat.S_ISFIFO((tmp_path / "out3" / "fifo").lstat().st_mode)


def test_a_single_file_keeps_its_mode_and_mtime(server: DevServer, tmp_path: Path) -> None:
    source = tmp_path / "script.sh"
    source.write_bytes(b"#!/bin/sh\n" + os.urandom(3 << 20))
    os.chmod(source, 0o4751)
    os.utime(source, ns=(946_684_800_123_456_789, 946_684_800_123_456_789))
    ok(backup(server, str(source), "-o", str(tmp_path / "f.kms")))
    ok(restore(server, str(tmp_path / "f.kms"), "-o", str(tmp_path / "back.sh")))
    info = (tmp_path / "back.sh").stat()
    assert stat.S_IMODE(info.st_mode) == 0o4751
    assert info.st_mtime_ns == 946_684_800_123_456_789
    assert (tmp_path / "back.sh").read_bytes() == source.read_bytes()


def test_restore_never_replaces_a_device_or_fifo_even_with_force(
    server: DevServer, tmp_path: Path
) -> None:
    (tmp_path / "f").write_bytes(b"payload")
    ok(backup(server, str(tmp_path / "f"), "-o", str(tmp_path / "f.kms")))
    device = tmp_path / "null"
    if IS_ROOT:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        os.mkfifo(device)
    before = device.lstat()
    done = restore(server, str(tmp_path / "f.kms"), "-o", str(device), "--force")
    assert done.returncode == 2
    assert b"not a regular file" in done.stderr
    after = device.lstat()
    assert (after.st_mode, after.st_rdev, after.st_ino) == (before.st_mode, before.st_rdev,
                                                           before.st_ino)  # fmt: skip


def test_a_file_archive_never_replaces_a_directory(server: DevServer, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"payload")
    ok(backup(server, str(tmp_path / "f"), "-o", str(tmp_path / "f.kms")))
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "sub" / "keep").write_text("keep me")
    done = restore(server, str(tmp_path / "f.kms"), "-o", str(tmp_path / "dir"), "--force")
    assert done.returncode == 2
    assert b"is a directory" in done.stderr
    assert (tmp_path / "dir" / "sub" / "keep").read_text() == "keep me"


@pytest.mark.parametrize("old", ["tree", "file"])
def test_force_replaces_an_old_target_whole_and_leaves_nothing_beside_it(
    server: DevServer, tmp_path: Path, old: str
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "new").write_text("new tree")
    ok(backup(server, str(tmp_path / "src"), "-o", str(tmp_path / "t.kms")))
    out = tmp_path / "out"
    out.mkdir()
    if old == "tree":
        (out / "target" / "locked").mkdir(parents=True)
        (out / "target" / "locked" / "old").write_text("old tree")
        (out / "target" / "locked").chmod(0o500)  # a read-only directory in the old tree
    else:
        (out / "target").write_text("old file")
    ok(restore(server, str(tmp_path / "t.kms"), "-o", str(out / "target"), "--force"))
    assert os.listdir(out) == ["target"]
    assert os.listdir(out / "target") == ["new"]


def test_an_archive_inside_its_source_does_not_hold_itself(
    server: DevServer, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(100_000))
    archive = src / "self.kms"
    ok(backup(server, str(src), "-o", str(archive)))
    first = archive.stat().st_size
    done = ok(backup(server, str(src), "-o", str(archive), "--force"))  # must not nest
    assert b"it is the archive being written" in done.stderr
    assert archive.stat().st_size < first + 1000
    listing = ok(restore(server, "--list", str(archive))).stdout.decode()
    assert "self.kms" not in listing
    assert "data" in listing


def test_output_equal_to_the_source_is_refused(server: DevServer, tmp_path: Path) -> None:
    source = tmp_path / "precious"
    source.write_bytes(b"do not replace me")
    done = backup(server, str(source), "-o", str(source), "--force")
    assert done.returncode == 2
    assert b"is the source" in done.stderr
    assert source.read_bytes() == b"do not replace me"


def _wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_killed_backup_leaves_no_partial_archive(
    server: DevServer, tmp_path: Path, signum: int
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen(
        command(server, "backup", "backup", "create", "--key", KEY, "-", "-o",
                str(out / "a.kms")),
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=child_environment(),
    )  # fmt: skip
    assert child.stdin is not None
    for _ in range(8):  # several segments, so sealing and writing are under way
        child.stdin.write(os.urandom(1 << 20))
        child.stdin.flush()
    time.sleep(0.3)
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=60)
    assert os.listdir(out) == []
    if signum != signal.SIGKILL:
        assert child.returncode == 130
        assert b"Traceback" not in stderr
        assert b"interrupted" in stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
@pytest.mark.parametrize("payload", ["file", "tree"])
def test_a_killed_restore_leaves_nothing_behind(
    server: DevServer, tmp_path: Path, signum: int, payload: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(8 << 20))
    source = src if payload == "tree" else src / "big"
    archive = tmp_path / "a.kms"
    ok(backup(server, str(source), "-o", str(archive)))
    data = archive.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen(
        command(server, "restore", "restore", "-", "-o", str(out / "restored")),
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=child_environment(),
    )  # fmt: skip
    assert child.stdin is not None
    child.stdin.write(data[: len(data) // 2])  # then the archive stalls, as on a slow link
    child.stdin.flush()
    if payload == "tree":
        _wait_for(lambda: os.listdir(out))  # the hidden staging directory exists
    else:
        time.sleep(1.0)
    child.send_signal(signum)
    child.stdin.close()
    child.wait(timeout=60)
    stderr = child.stderr.read() if child.stderr else b""
    if signum == signal.SIGKILL and payload == "tree":
        # No cleanup survives SIGKILL: the staging directory is left, named for its process
        # (the next restore here removes it), and the target never appears.
        [left] = os.listdir(out)
        assert left.startswith(f".restored.kms-restore-{child.pid}-")
        assert not (out / "restored").exists()
        return
    assert os.listdir(out) == []
    if signum != signal.SIGKILL:
        assert child.returncode == 130
        assert b"Traceback" not in stderr


def _stalled_restore(server: DevServer, data: bytes, target: Path) -> subprocess.Popen[bytes]:
    """A tree restore that got half its archive and waits for the rest, staging under way."""
    child = subprocess.Popen(
        command(server, "restore", "restore", "-", "-o", str(target)),
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=child_environment(),
    )  # fmt: skip
    assert child.stdin is not None
    child.stdin.write(data[: len(data) // 2])
    child.stdin.flush()
    _wait_for(lambda: any(".kms-restore-" in name for name in os.listdir(target.parent)))
    return child


def test_the_next_restore_removes_what_a_sigkilled_tree_restore_left(
    server: DevServer, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(8 << 20))
    archive = tmp_path / "a.kms"
    ok(backup(server, str(src), "-o", str(archive)))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".keep.kms-restore-notes").mkdir()  # not a staging name: never touched
    child = _stalled_restore(server, archive.read_bytes(), out / "first")
    child.kill()
    child.wait(timeout=60)
    [left] = [name for name in os.listdir(out) if name.startswith(".first.kms-restore-")]
    assert left.startswith(f".first.kms-restore-{child.pid}-")

    done = ok(restore(server, str(archive), "-o", str(out / "second")))
    said = f"removed {out / left}, left by an interrupted restore (process {child.pid})"
    assert said.encode() in done.stderr
    assert sorted(os.listdir(out)) == [".keep.kms-restore-notes", "second"]
    assert (out / "second" / "big").read_bytes() == (src / "big").read_bytes()


def test_a_restore_in_progress_keeps_its_staging_directory_when_another_restore_sweeps(
    server: DevServer, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(8 << 20))
    archive = tmp_path / "a.kms"
    ok(backup(server, str(src), "-o", str(archive)))
    data = archive.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    slow = _stalled_restore(server, data, out / "slow")
    staged = [name for name in os.listdir(out) if ".kms-restore-" in name]
    done = ok(restore(server, str(archive), "-o", str(out / "quick")))
    assert b"removed" not in done.stderr
    assert [name for name in os.listdir(out) if ".kms-restore-" in name] == staged
    assert slow.stdin is not None
    slow.stdin.write(data[len(data) // 2 :])
    slow.stdin.close()
    assert slow.wait(timeout=60) == 0
    assert sorted(os.listdir(out)) == ["quick", "slow"]


def test_a_broken_pipe_on_stdout_fails_without_a_traceback(
    server: DevServer, tmp_path: Path
) -> None:
    (tmp_path / "f").write_bytes(os.urandom(8 << 20))
    ok(backup(server, str(tmp_path / "f"), "-o", str(tmp_path / "f.kms")))
    reader, writer = os.pipe()
    child = subprocess.Popen(
        command(server, "restore", "restore", str(tmp_path / "f.kms"), "-o", "-"),
        stdout=writer, stderr=subprocess.PIPE, cwd=REPO, env=child_environment(),
    )  # fmt: skip
    os.close(writer)
    os.read(reader, 10)
    os.close(reader)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 1
    assert b"standard output was closed" in stderr
    assert b"Traceback" not in stderr


def test_stdout_gets_each_verified_segment_and_a_failure_exits_non_zero(
    server: DevServer, tmp_path: Path
) -> None:
    payload = os.urandom(3 << 20)
    made = ok(backup(server, "-", "-o", "-", "--compression", "none", stdin=payload))
    archive = bytearray(made.stdout)
    archive[-1000] ^= 0x01  # inside the last segment
    done = restore(server, "-", "-o", "-", stdin=bytes(archive))
    assert done.returncode == 1
    assert b"segment 2 failed authentication" in done.stderr
    assert done.stdout == payload[: 2 << 20]  # released as verified, and no more


def test_help_says_consumers_of_stdout_must_check_the_exit_status() -> None:
    done = subprocess.run([sys.executable, "-m", "client.restore", "--help"], cwd=REPO,
                          env=child_environment(), capture_output=True, check=True)  # fmt: skip
    assert b"check the exit status" in done.stdout


def test_list_include_and_exclude(server: DevServer, tmp_path: Path) -> None:
    make_full_tree(tmp_path / "src")
    archive = tmp_path / "t.kms"
    ok(backup(server, str(tmp_path / "src"), "-o", str(archive), "--exclude", "sticky",
              "--exclude", "nested/deeper"))  # fmt: skip
    listing = ok(restore(server, "--list", str(archive))).stdout.decode().splitlines()
    names = [line.split()[-1] for line in listing if " -> " not in line]
    assert "sticky" not in names and "nested/deeper" not in names
    assert "setuid" in names
    setuid = next(line for line in listing if line.endswith(" setuid"))
    assert setuid.startswith("-rwsr-xr-x")
    rows = json.loads(ok(restore(server, "--list", str(archive), "--json")).stdout)["entries"]
    setuid_row = next(r for r in rows if r["path"] == "setuid")
    assert (setuid_row["size"], setuid_row["mode"], setuid_row["type"]) == (10, "0o4755", "-")
    assert next(r for r in rows if r["path"] == "plain.txt")["link"] == "nested/hard-link"

    ok(restore(server, str(archive), "-o", str(tmp_path / "part"), "--include", "nested",
               "--include", "plain.txt"))  # fmt: skip
    names = sorted(str(p.relative_to(tmp_path / "part")) for p in (tmp_path / "part").rglob("*"))
    assert names == ["nested", "nested/escaping-link", "nested/hard-link", "nested/readonly-dir",
                     "nested/readonly-dir/inside", "plain.txt"]  # fmt: skip
    done = restore(server, str(archive), "-o", str(tmp_path / "none"), "--include", "nope")
    assert done.returncode == 1
    assert b"nothing in the archive matches --include nope" in done.stderr
    assert not (tmp_path / "none").exists()


def write_wide_tree(server: DevServer, path: Path, count: int) -> None:
    """A real archive (a data key from the server) of one directory holding `count` empty
    files with 100-byte names: made in-process, far quicker than that many real files."""
    token = server.token_file("backup").read_text().strip()
    backup_id = str(uuid.uuid4())
    with KmsClient(ClientConfig(addr=server.address, token=token)) as client:
        issued = client.get_active_key(KEY, backup_id)
    header = ArchiveHeader(backup_id=backup_id, key_name=KEY, key_version=issued.version,
                           wrapped_data_key=issued.wrapped_data_key,
                           payload_kind=PayloadKind.TREE, compression=Compression.ZSTD,
                           compression_level=3)  # fmt: skip

    def entry(kind: bytes, name: str) -> bytes:
        raw = name.encode()
        return tree_format.ENTRY.pack(kind, len(raw), 0o644, 0, 0, 0, 0, 0) + raw

    with open(path, "wb") as out, ArchiveWriter(out, header, issued.data_key) as writer:
        writer.write(entry(tree_format.DIRECTORY, ""))
        empty = tree_format.FILE_DATA.pack(0, 0)
        for number in range(count):
            writer.write(entry(tree_format.FILE, f"{number:09d}-" + "x" * 90) + empty)
        writer.write(tree_format.ENTRY.pack(tree_format.END, 0, 0, 0, 0, 0, 0, 0))


def peak_rss_mib(server: DevServer, *args: str) -> float:
    """Peak RSS of a kms-restore run, from wait4 in a small wrapper (not pytest's fork)."""
    done = subprocess.run(
        [sys.executable, "-S", "-m", "benchmarks.rusage", *command(server, "restore", "restore",
                                                                    *args)],
        cwd=REPO, env=child_environment(), capture_output=True, check=True, timeout=300,
    )  # fmt: skip
    figures = json.loads(done.stdout.decode().splitlines()[-1])
    assert figures["returncode"] == 0, done.stderr.decode()
    return float(figures["max_rss_kib"]) / 1024


@pytest.mark.parametrize("as_json", [False, True])
def test_list_memory_does_not_grow_with_the_number_of_entries(
    server: DevServer, tmp_path: Path, as_json: bool
) -> None:
    # Both past one segment, so both runs have the same buffers and worker threads: what
    # differs is the number of entries (held in a list, 250,000 cost some 130 MiB more).
    few, many = tmp_path / "few.kms", tmp_path / "many.kms"
    write_wide_tree(server, few, 50_000)
    write_wide_tree(server, many, 250_000)
    json_flag = ["--json"] if as_json else []
    small = peak_rss_mib(server, "--list", str(few), *json_flag)
    large = peak_rss_mib(server, "--list", str(many), *json_flag)
    assert large - small < 8, (
        f"peak RSS {small:.1f} MiB for 50,000 entries, {large:.1f} for 250,000"
    )
    listed = ok(restore(server, "--list", str(few), *json_flag)).stdout
    if as_json:
        rows = json.loads(listed)["entries"]
        assert len(rows) == 50_001 and rows[1]["path"] == "000000000-" + "x" * 90
    else:
        lines = listed.decode().splitlines()
        assert len(lines) == 50_001 and lines[-1].endswith(" 000049999-" + "x" * 90)


def test_several_sources_make_one_tree(server: DevServer, tmp_path: Path) -> None:
    make_full_tree(tmp_path / "one")
    (tmp_path / "two.txt").write_bytes(b"second source")
    ok(backup(server, str(tmp_path / "one"), str(tmp_path / "two.txt"), "-o",
              str(tmp_path / "m.kms")))  # fmt: skip
    ok(restore(server, str(tmp_path / "m.kms"), "-o", str(tmp_path / "out")))
    assert sorted(os.listdir(tmp_path / "out")) == ["one", "two.txt"]
    assert_same_tree(tmp_path / "one", tmp_path / "out" / "one")
    assert (tmp_path / "out" / "two.txt").read_bytes() == b"second source"


def test_inspect_reads_the_header_without_the_kms(server: DevServer, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 10_000)
    made = ok(backup(server, str(tmp_path / "f"), "-o", str(tmp_path / "f.kms"), "--json"))
    summary = json.loads(made.stdout)
    # No token, and an address where nothing listens: the header needs neither.
    done = subprocess.run(
        [sys.executable, "-m", "client.restore", "--inspect", str(tmp_path / "f.kms"), "--json",
         "--addr", "127.0.0.1:9"],
        cwd=REPO, env=child_environment(), capture_output=True,
    )  # fmt: skip
    header = json.loads(ok(done).stdout)
    assert header["backup_id"] == summary["backup_id"]
    assert (header["key"], header["key_version"], header["format_version"]) == (KEY, 1, 2)
    assert (header["payload"], header["compression"]) == ("file", "zstd:3")
    assert header["created"].endswith("Z")
    with open(tmp_path / "f.kms", "rb") as stream:
        assert read_header(stream).header.backup_id == summary["backup_id"]


def test_compression_shrinks_text_and_the_summary_reports_the_ratio(
    server: DevServer, tmp_path: Path
) -> None:
    text = b"".join(
        b"INSERT INTO t VALUES (%d, 'name %d');\n" % (i, i % 97) for i in range(100_000)
    )
    (tmp_path / "dump.sql").write_bytes(text)
    packed = json.loads(ok(backup(server, str(tmp_path / "dump.sql"), "-o",
                                  str(tmp_path / "z.kms"), "--json")).stdout)  # fmt: skip
    plain = json.loads(ok(backup(server, str(tmp_path / "dump.sql"), "-o",
                                 str(tmp_path / "n.kms"), "--json", "--compression",
                                 "none")).stdout)  # fmt: skip
    assert packed["ratio"] < 0.2 < 0.99 < plain["ratio"]
    assert packed["archive_bytes"] == (tmp_path / "z.kms").stat().st_size
    assert (tmp_path / "z.kms").stat().st_size < len(text) // 5
    ok(restore(server, str(tmp_path / "z.kms"), "-o", str(tmp_path / "back.sql")))
    assert (tmp_path / "back.sql").read_bytes() == text
    human = ok(backup(server, str(tmp_path / "dump.sql"), "-o", str(tmp_path / "h.kms")))
    assert b"ratio 0." in human.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compression", "gzip"], b"--compression gzip"),
        (["--compression", "zstd:99"], b"1..22"),
    ],
)
def test_usage_errors_exit_2(
    server: DevServer, tmp_path: Path, args: list[str], message: bytes
) -> None:
    (tmp_path / "f").write_bytes(b"x")
    done = backup(server, str(tmp_path / "f"), "-o", str(tmp_path / "f.kms"), *args)
    assert done.returncode == 2
    assert message in done.stderr
    done = backup(server, str(tmp_path / "missing"), "-o", str(tmp_path / "m.kms"))
    assert done.returncode == 2
    assert b"does not exist" in done.stderr


def on_a_terminal(argv: list[str]) -> bytes:
    """Run a program with its stderr on a pseudo-terminal; returns what it drew there."""
    primary, secondary = pty.openpty()
    child = subprocess.Popen(
        argv, stderr=secondary, stdout=subprocess.DEVNULL, cwd=REPO, env=child_environment()
    )
    os.close(secondary)
    seen = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    assert child.wait(timeout=60) == 0, seen
    return seen


def test_progress_shows_on_a_terminal_and_never_in_a_pipe(
    server: DevServer, tmp_path: Path
) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_bytes(os.urandom(16 << 20))
    piped = ok(backup(server, str(tmp_path / "tree" / "f"), "-o", str(tmp_path / "p.kms")))
    assert b"\r" not in piped.stderr
    for source, archive in [("tree/f", "f.kms"), ("tree", "t.kms")]:
        argv = ["create", "--key", KEY, str(tmp_path / source), "-o", str(tmp_path / archive)]
        seen = on_a_terminal(command(server, "backup", "backup", *argv))
        assert b"/s" in seen and b"MiB" in seen and b"ETA" in seen, seen
    seen = on_a_terminal(command(server, "restore", "restore", str(tmp_path / "t.kms"), "-o",
                                 str(tmp_path / "restored")))  # fmt: skip
    assert b"ETA" in seen, seen
    quiet = ok(backup(server, str(tmp_path / "tree"), "-o", str(tmp_path / "q.kms"), "--quiet"))
    assert quiet.stdout == b"" and quiet.stderr == b""


def test_describe_sees_a_changed_mode(tmp_path: Path) -> None:
    # The checker itself must notice what the old programs lost.
    make_full_tree(tmp_path / "a")
    before = describe(tmp_path / "a")
    os.chmod(tmp_path / "a" / "setuid", 0o755)
    assert describe(tmp_path / "a") != before


def test_names_that_are_not_utf8_round_trip_and_list(server: DevServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(os.fsencode(src) + b"/bad\xffname", "wb") as out:
        out.write(b"x")
    ok(backup(server, str(src), "-o", str(tmp_path / "t.kms")))
    listing = ok(restore(server, "--list", str(tmp_path / "t.kms")))
    assert b"bad\\xffname" in listing.stdout
    ok(restore(server, str(tmp_path / "t.kms"), "-o", str(tmp_path / "out")))
    assert os.listdir(os.fsencode(tmp_path / "out")) == [b"bad\xffname"]
