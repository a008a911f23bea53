"""A tree with one of everything, and a checker that compares two trees as `stat` sees them.

Compared per entry: type, all mode bits, owner, mtime in nanoseconds, size, content,
link target, device number, extended attributes (POSIX ACLs included), which entries
are hard links of each other, and where the holes are (SEEK_DATA / SEEK_HOLE).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
from pathlib import Path

OLD_NS = 946_684_800_123_456_789  # 2000-01-01 plus odd nanoseconds, so a rounding shows
HOLE = 8 << 20


def posix_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """The kernel's xattr encoding of an ACL: version 2, then (tag, perm, id) per entry."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


# user::rwx, user 1234 r-x, group::r-x, mask::r-x, other::r--
ACL = posix_acl([(0x01, 7, 0xFFFFFFFF), (0x02, 5, 1234), (0x04, 5, 0xFFFFFFFF),
                 (0x10, 5, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)])  # fmt: skip


def _try_setxattr(path: Path, name: str, value: bytes) -> bool:
    try:
        os.setxattr(path, name, value)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EINVAL):
            return False
        raise
    return True


def make_full_tree(root: Path, *, special: bool = False) -> dict[str, bool]:
    """One of everything; returns which optional features the filesystem took."""
    features = {}
    root.mkdir()
    (root / "plain.txt").write_bytes(b"plain\n")
    (root / "group-writable").write_bytes(b"g+w")
    os.chmod(root / "group-writable", 0o664)
    (root / "world-writable").write_bytes(b"o+w")
    os.chmod(root / "world-writable", 0o666)
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "setgid-dir").mkdir()
    os.chmod(root / "setgid-dir", 0o2775)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "empty-dir").mkdir()
    (root / "empty-file").write_bytes(b"")
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "nested" / "deeper" / "data.bin").write_bytes(os.urandom(3 << 20))
    (root / "nested" / "readonly-dir").mkdir()
    (root / "nested" / "readonly-dir" / "inside").write_bytes(b"in a 0555 directory")
    os.chmod(root / "nested" / "readonly-dir", 0o555)
    os.symlink("/etc/hostname", root / "absolute-link")
    os.symlink("../outside", root / "nested" / "escaping-link")
    os.symlink("nested", root / "dir-link")
    os.symlink("does-not-exist", root / "dangling-link")
    os.link(root / "plain.txt", root / "nested" / "hard-link")
    with open(root / "sparse", "wb") as out:  # data, a hole, data, then a trailing hole
        out.write(b"head" * 1024)
        out.seek(HOLE)
        out.write(b"middle")
        out.truncate(3 * HOLE)
    features["xattr"] = _try_setxattr(root / "plain.txt", "user.note", b"kept\x00binary")
    features["acl"] = _try_setxattr(root / "group-writable", "system.posix_acl_access", ACL)
    if features["acl"]:
        os.chmod(root / "group-writable", 0o664)
    if special:
        os.mkfifo(root / "fifo", 0o640)
        if os.geteuid() == 0:
            os.mknod(root / "null-device", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    if os.geteuid() == 0:
        os.chown(root / "plain.txt", 1234, 5678)
        os.chown(root / "absolute-link", 4321, 8765, follow_symlinks=False)
    entries = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for offset, path in enumerate([*entries, root]):
        when = OLD_NS + offset * 3_600_000_000_007
        os.utime(path, ns=(when, when), follow_symlinks=False)
    return features


def _extents(path: Path, size: int) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        result, offset = [], 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            result.append((start, end))
            offset = end
        return result
    finally:
        os.close(fd)


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def describe(root: Path, *, include_root_times: bool = True) -> dict[str, object]:
    """Everything restorable about every entry, keyed by relative path."""
    result: dict[str, object] = {}
    inodes: dict[int, list[str]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        name = str(path.relative_to(root))
        info = path.lstat()
        entry: dict[str, object] = {
            "type": stat.S_IFMT(info.st_mode),
            "mode": stat.S_IMODE(info.st_mode),
            "mtime_ns": info.st_mtime_ns,
            "xattrs": _xattrs(path),
        }
        if os.geteuid() == 0:
            entry["owner"] = (info.st_uid, info.st_gid)
        if name == "." and not include_root_times:
            del entry["mtime_ns"]
        if stat.S_ISLNK(info.st_mode):
            entry["link"] = os.readlink(path)
            del entry["mode"]
        elif stat.S_ISREG(info.st_mode):
            entry["size"] = info.st_size
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            entry["extents"] = _extents(path, info.st_size)
            inodes.setdefault(info.st_ino, []).append(name)
        elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
            entry["rdev"] = info.st_rdev
        result[name] = entry
    result["hard links"] = sorted(names for names in inodes.values() if len(names) > 1)
    return result


def assert_same_tree(source: Path, restored: Path) -> None:
    before, after = describe(source), describe(restored)
    assert sorted(before) == sorted(after), "the trees hold different names"
    for name in before:
        assert after[name] == before[name], f"{name} differs"
