"""The tree encoding of format version 2: one entry per file, directory, link or node.

Entries carry everything `stat` says that can be restored (all mode bits, owner,
times in nanoseconds), extended attributes (POSIX ACLs included), hard links and
the data extents of sparse files. A single-file backup is one entry. Extraction
works under a private staging directory, creates every name itself (never through
a symlink, never outside the staging directory) and keeps memory flat.
See docs/archive-format.md.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import shutil
import stat
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from client.archive.header import PayloadError

ENTRY = struct.Struct(">cHIIIqqH")  # type, path length, mode, uid, gid, atime, mtime, xattrs
XATTR = struct.Struct(">HI")  # name length, value length
FILE_DATA = struct.Struct(">QI")  # logical size, extent count
EXTENT = struct.Struct(">QQ")  # offset, length
MAX_PATH = 4096
MAX_XATTRS = 4096
MAX_XATTR_VALUE = 1 << 20
MAX_EXTENTS = 1 << 20

DIRECTORY, FILE, SYMLINK, HARDLINK = b"D", b"F", b"L", b"H"
FIFO, CHAR_DEVICE, BLOCK_DEVICE, END = b"P", b"C", b"B", b"E"
_TYPES = {DIRECTORY, FILE, SYMLINK, HARDLINK, FIFO, CHAR_DEVICE, BLOCK_DEVICE, END}
_SPECIAL = {FIFO: stat.S_IFIFO, CHAR_DEVICE: stat.S_IFCHR, BLOCK_DEVICE: stat.S_IFBLK}
COPY_CHUNK = 1 << 20


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def readfrom(self, source: _ReadInto, limit: int = -1) -> int: ...


class _ReadInto(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Source(Protocol):
    def readview(self, limit: int = -1) -> memoryview: ...


@dataclass
class Entry:
    """One entry as read back from an archive."""

    kind: bytes
    path: str
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    size: int = 0
    extents: list[tuple[int, int]] = field(default_factory=list)
    link: str = ""  # symlink target, or the earlier entry a hard link names
    rdev: int = 0


def _xattrs_of(path: str, *, follow: bool) -> list[tuple[bytes, bytes]]:
    if not hasattr(os, "listxattr"):
        return []
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    result = []
    for name in sorted(names):
        try:
            result.append((name.encode(), os.getxattr(path, name, follow_symlinks=follow)))
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise
    return result


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The regions of a file that hold data (SEEK_DATA/SEEK_HOLE); the rest are holes."""
    if size == 0:
        return []
    if not hasattr(os, "SEEK_DATA"):
        return [(0, size)]
    extents: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if end > start:
                extents.append((start, end - start))
            offset = end
    except OSError:
        return [(0, size)]  # a filesystem without hole reporting: all data
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return extents


def _encode_entry(
    kind: bytes, path: str, info: os.stat_result, xattrs: Sequence[tuple[bytes, bytes]]
) -> bytes:
    name = os.fsencode(path)
    if len(name) > MAX_PATH:
        raise ValueError(f"{path}: path longer than {MAX_PATH} bytes")
    out = [
        ENTRY.pack(
            kind,
            len(name),
            stat.S_IMODE(info.st_mode),
            info.st_uid,
            info.st_gid,
            info.st_atime_ns,
            info.st_mtime_ns,
            len(xattrs),
        ),
        name,
    ]
    for key, value in xattrs:
        out += [XATTR.pack(len(key), len(value)), key, value]
    return b"".join(out)


def _short_string(value: str) -> bytes:
    raw = os.fsencode(value)
    if len(raw) > MAX_PATH:
        raise ValueError(f"link target longer than {MAX_PATH} bytes: {value}")
    return struct.pack(">H", len(raw)) + raw


def is_excluded(relative: str, patterns: Sequence[str]) -> bool:
    """A pattern with a / matches the path below the source, one without matches the name."""
    base = relative.rsplit("/", 1)[-1]
    for pattern in patterns:
        target = relative if "/" in pattern.strip("/") else base
        if fnmatch.fnmatchcase(target, pattern.strip("/")):
            return True
    return False


def data_size(root: str, excludes: Sequence[str], prefix: str = "") -> int:
    """About the bytes a backup of `root` will read (for the progress line's ETA)."""
    total = 0
    try:
        children = list(os.scandir(root))
    except OSError:
        return 0
    for child in children:
        relative = f"{prefix}/{child.name}" if prefix else child.name
        if is_excluded(relative, excludes):
            continue
        try:
            info = child.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            total += data_size(child.path, excludes, relative)
        elif stat.S_ISREG(info.st_mode):
            total += min(info.st_size, info.st_blocks * 512)  # holes are not read
    return total


@dataclass
class Scanner:
    """Writes sources into a sink in the tree encoding; counts and warns as it goes."""

    sink: Sink
    special_files: bool = False
    excludes: Sequence[str] = ()
    skip: set[tuple[int, int]] = field(default_factory=set)  # (dev, ino) never to archive
    warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr)
    entries: int = 0
    _links: dict[tuple[int, int], str] = field(default_factory=dict)

    def excluded(self, relative: str) -> bool:
        return is_excluded(relative, self.excludes)

    def add_file(self, source: str, name: str, *, follow: bool = False) -> None:
        """One regular file (the whole payload of a file backup, or a tree member)."""
        fd = os.open(source, os.O_RDONLY | (0 if follow else getattr(os, "O_NOFOLLOW", 0)))
        try:
            held = os.fstat(fd)
            if not stat.S_ISREG(held.st_mode):
                raise ValueError(f"{source} changed while being archived")
            extents = _data_extents(fd, held.st_size)
            header = _encode_entry(FILE, name, held, _xattrs_of(source, follow=follow))
            body = [FILE_DATA.pack(held.st_size, len(extents))]
            body += [EXTENT.pack(offset, length) for offset, length in extents]
            self.sink.write(header + b"".join(body))
            with open(fd, "rb", buffering=0, closefd=False) as reader:
                for offset, length in extents:
                    os.lseek(fd, offset, os.SEEK_SET)
                    got = self.sink.readfrom(reader, length)
                    if got < length:  # the file shrank while being read: keep the promise
                        self.warn(f"warning: {source} shrank while being archived")
                        zeros = bytes(min(COPY_CHUNK, length - got))
                        while got < length:
                            got += self.sink.write(zeros[: length - got])
        finally:
            os.close(fd)
        self.entries += 1

    def add_tree(self, root: str, prefix: str) -> None:
        """`root` (a directory) and everything below it, names under `prefix` ("" = top)."""
        self._add_directory(root, prefix, os.stat(root))

    def _add_directory(self, path: str, name: str, info: os.stat_result) -> None:
        self.sink.write(_encode_entry(DIRECTORY, name, info, _xattrs_of(path, follow=True)))
        self.entries += 1
        try:
            children = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None
        for child in children:
            relative = f"{name}/{child.name}" if name else child.name
            if self.excluded(relative):
                continue
            try:
                child_info = os.lstat(child.path)
            except FileNotFoundError:
                self.warn(f"warning: {child.path} vanished while being archived")
                continue
            self._add_member(child.path, relative, child_info)

    def _add_member(self, path: str, name: str, info: os.stat_result) -> None:
        key = (info.st_dev, info.st_ino)
        if key in self.skip:
            self.warn(f"warning: skipping {path}: it is the archive being written")
            return
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            self._add_directory(path, name, info)
            return
        if not stat.S_ISLNK(mode) and info.st_nlink > 1 and key in self._links:
            self.sink.write(
                _encode_entry(HARDLINK, name, info, ()) + _short_string(self._links[key])
            )
            self.entries += 1
            return
        if stat.S_ISREG(mode):
            self.add_file(path, name)
        elif stat.S_ISLNK(mode):
            xattrs = _xattrs_of(path, follow=False)
            entry = _encode_entry(SYMLINK, name, info, xattrs)
            self.sink.write(entry + _short_string(os.readlink(path)))
            self.entries += 1
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            if not self.special_files:
                self.warn(f"warning: skipping {path}: a special file (see --special-files)")
                return
            kind = (
                FIFO
                if stat.S_ISFIFO(mode)
                else CHAR_DEVICE
                if stat.S_ISCHR(mode)
                else (BLOCK_DEVICE)
            )
            entry = _encode_entry(kind, name, info, _xattrs_of(path, follow=False))
            self.sink.write(entry + struct.pack(">Q", info.st_rdev if kind != FIFO else 0))
            self.entries += 1
        else:
            self.warn(f"warning: skipping {path}: sockets cannot be archived")
            return
        if info.st_nlink > 1:
            self._links[key] = name

    def end(self) -> None:
        self.sink.write(ENTRY.pack(END, 0, 0, 0, 0, 0, 0, 0))


# ---------------------------------------------------------------------------- reading


class EntryReader:
    """Reads entries from verified plaintext; file data is left to the caller to consume."""

    def __init__(self, source: Source) -> None:
        self._source = source

    def _exact(self, size: int, what: str) -> bytes:
        parts = []
        wanted = size
        while wanted:
            view = self._source.readview(wanted)
            if not view:
                raise PayloadError(f"the payload ends inside {what}")
            parts.append(bytes(view))
            wanted -= len(view)
        return b"".join(parts)

    def _string(self, what: str) -> str:
        (length,) = struct.unpack(">H", self._exact(2, what))
        if length > MAX_PATH:
            raise PayloadError(f"{what} longer than {MAX_PATH} bytes")
        return os.fsdecode(self._exact(length, what))

    def next(self) -> Entry | None:
        """The next entry, None after the end marker."""
        kind, length, mode, uid, gid, atime, mtime, count = ENTRY.unpack(
            self._exact(ENTRY.size, "an entry")
        )
        if kind not in _TYPES:
            raise PayloadError(f"unknown entry type {kind!r}")
        if kind == END:
            if self._source.readview(1):
                raise PayloadError("data follows the end of the tree")
            return None
        if length > MAX_PATH or count > MAX_XATTRS or mode > 0o7777:
            raise PayloadError("an entry header is out of range")
        path = os.fsdecode(self._exact(length, "an entry's path"))
        entry = Entry(kind, path, mode, uid, gid, atime, mtime)
        for _ in range(count):
            name_length, value_length = XATTR.unpack(self._exact(XATTR.size, "an xattr"))
            if value_length > MAX_XATTR_VALUE:
                raise PayloadError(f"{path}: an extended attribute is too large")
            name = self._exact(name_length, "an xattr name")
            entry.xattrs.append((name, self._exact(value_length, "an xattr value")))
        if kind == FILE:
            entry.size, extents = FILE_DATA.unpack(self._exact(FILE_DATA.size, "file data"))
            if extents > MAX_EXTENTS:
                raise PayloadError(f"{path}: too many extents")
            end = 0
            for _ in range(extents):
                offset, size = EXTENT.unpack(self._exact(EXTENT.size, "an extent"))
                if offset < end or offset + size > entry.size or size == 0:
                    raise PayloadError(f"{path}: extents out of order or past the end")
                entry.extents.append((offset, size))
                end = offset + size
        elif kind in (SYMLINK, HARDLINK):
            entry.link = self._string("a link target")
        elif kind in _SPECIAL:
            (entry.rdev,) = struct.unpack(">Q", self._exact(8, "a device number"))
        return entry

    def copy_data(self, entry: Entry, write: Callable[[int, memoryview], None]) -> None:
        """Hand each piece of the entry's data to `write(offset, piece)`."""
        for offset, size in entry.extents:
            position, left = offset, size
            while left:
                view = self._source.readview(min(left, COPY_CHUNK))
                if not view:
                    raise PayloadError(f"the payload ends inside the data of {entry.path}")
                write(position, view)
                position += len(view)
                left -= len(view)

    def skip_data(self, entry: Entry) -> None:
        self.copy_data(entry, lambda _offset, _view: None)


def check_name(path: str) -> list[str]:
    """The components of a relative entry name; refuses anything that could leave the root."""
    if path == "":
        return []
    parts = path.split("/")
    if any(part in ("", ".", "..") or "\0" in part for part in parts):
        raise PayloadError(f"refusing entry {path!r}: not a plain relative path")
    return parts


def write_all_fd(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def apply_metadata(
    path: str, entry: Entry, *, fd: int | None, warn: Callable[[str], None], owner: bool
) -> None:
    """Owner (as root), xattrs, mode, then times: chown clears setuid, so mode comes after."""
    target: int | str = fd if fd is not None else path
    follow = entry.kind != SYMLINK
    if owner:
        try:
            os.chown(target, entry.uid, entry.gid, follow_symlinks=follow)
        except OSError as exc:
            warn(f"warning: cannot set the owner of {path}: {exc.strerror}")
    for name, value in entry.xattrs:
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as exc:
            warn(f"warning: cannot set extended attribute {name.decode()} on {path}: "
                 f"{exc.strerror}")  # fmt: skip
    if entry.kind != SYMLINK:
        os.chmod(target, entry.mode)
    if follow or os.utime in os.supports_follow_symlinks:
        os.utime(target, ns=(entry.atime_ns, entry.mtime_ns), follow_symlinks=follow)


class Extractor:
    """Materialises entries under `root`, a directory this process just created.

    Memory stays flat whatever the number of entries: the filesystem itself says
    what exists (every create is exclusive), and only the directories from the root
    down to the current entry are held, so their metadata is set as each one is left.
    """

    def __init__(
        self,
        root: str,
        *,
        warn: Callable[[str], None],
        includes: Sequence[str] = (),
        special_files: bool = False,
    ) -> None:
        self._root = root
        self._special_files = special_files
        self._warn = warn
        self._owner = os.geteuid() == 0 if hasattr(os, "geteuid") else False
        # The directories created here from the root down to the last entry: the only
        # valid parents, since the archive lists a directory's entries right after it.
        self._open: list[tuple[str, Entry]] = []
        self._includes = [p.strip("/") for p in includes]
        self.matched: set[str] = set()
        self.root_entry: Entry | None = None

    def _wanted(self, path: str) -> bool:
        if not self._includes:
            return True
        for include in self._includes:
            if path == include or path.startswith(include + "/"):
                self.matched.add(include)
                return True
            if include.startswith(path + "/"):
                return True  # a parent of something included
        return False

    def _close_until(self, parent: str) -> None:
        """Set the metadata of every open directory that is not `parent` or above it."""
        while self._open:
            path = self._open[-1][0]
            if parent == path or parent.startswith(path + "/"):
                return
            _, entry = self._open.pop()
            apply_metadata(os.path.join(self._root, path), entry, fd=None, warn=self._warn,
                           owner=self._owner)  # fmt: skip

    def _place(self, entry: Entry) -> str:
        parts = check_name(entry.path)
        parent = "/".join(parts[:-1])
        self._close_until(parent)
        if parent != (self._open[-1][0] if self._open else ""):
            raise PayloadError(f"refusing entry {entry.path!r}: its parent is not a directory "
                               "just before it in this archive")  # fmt: skip
        return os.path.join(self._root, entry.path)

    def extract(self, reader: EntryReader, entry: Entry) -> None:
        if entry.path == "":
            if entry.kind != DIRECTORY or self.root_entry is not None:
                raise PayloadError("the root entry of a tree must be one directory")
            self.root_entry = entry
            return
        if not self._wanted(entry.path):
            if entry.kind == FILE:
                reader.skip_data(entry)
            return
        kind = entry.kind
        if kind in _SPECIAL and not self._special_files:
            self._warn(f"warning: skipping {entry.path}: a special file (see --special-files)")
            return
        path = self._place(entry)
        try:
            self._create(reader, entry, path)
        except FileExistsError:
            raise PayloadError(f"refusing entry {entry.path!r}: it appears twice") from None

    def _create(self, reader: EntryReader, entry: Entry, path: str) -> None:
        kind = entry.kind
        if kind == DIRECTORY:
            os.mkdir(path, 0o700)
            self._open.append((entry.path, entry))
        elif kind == FILE:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(path, flags, 0o600)
            try:
                write_file_data(fd, reader, entry)
                apply_metadata(path, entry, fd=fd, warn=self._warn, owner=self._owner)
            finally:
                os.close(fd)
        elif kind == SYMLINK:
            os.symlink(entry.link, path)
            apply_metadata(path, entry, fd=None, warn=self._warn, owner=self._owner)
        elif kind == HARDLINK:
            target = self._link_target(entry.link)
            if target is None:
                self._warn(f"warning: skipping hard link {entry.path}: {entry.link} "
                           "was not restored")  # fmt: skip
                return
            os.link(target, path, follow_symlinks=False)
        else:
            try:
                os.mknod(path, 0o600 | _SPECIAL[kind], entry.rdev)
            except PermissionError:  # device nodes need root
                self._warn(f"warning: skipping {entry.path}: creating a device node needs root")
                return
            apply_metadata(path, entry, fd=None, warn=self._warn, owner=self._owner)

    def _link_target(self, name: str) -> str | None:
        """The restored non-directory `name`, reached without following any symlink."""
        parts = check_name(name)
        if not parts:
            return None
        current = self._root
        for index, part in enumerate(parts):
            current = os.path.join(current, part)
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                return None
            last = index == len(parts) - 1
            if (not last and not stat.S_ISDIR(mode)) or (last and stat.S_ISDIR(mode)):
                return None
        return current

    def finish(self) -> None:
        """Directory metadata last and deepest first: adding entries changes a directory's
        mtime, and a read-only directory could not be filled."""
        self._close_until("\0")  # no path lies under that: closes them all
        if self.root_entry is not None:
            apply_metadata(self._root, self.root_entry, fd=None, warn=self._warn,
                           owner=self._owner)  # fmt: skip
        missing = [p for p in self._includes if p not in self.matched]
        if missing:
            raise PayloadError(f"nothing in the archive matches --include {missing[0]}")


def write_file_data(fd: int, reader: EntryReader, entry: Entry) -> None:
    """The data extents at their offsets; the gaps stay holes, the size is set at the end."""
    position = [0]

    def write(offset: int, view: memoryview) -> None:
        if offset != position[0]:
            os.lseek(fd, offset, os.SEEK_SET)
        write_all_fd(fd, view)
        position[0] = offset + len(view)

    reader.copy_data(entry, write)
    os.ftruncate(fd, entry.size)


def iter_entries(reader: EntryReader) -> Iterator[Entry]:
    """Every entry, its data skipped (for --list)."""
    while (entry := reader.next()) is not None:
        if entry.kind == FILE:
            reader.skip_data(entry)
        yield entry


def describe_mode(entry: Entry) -> str:
    kind = {DIRECTORY: stat.S_IFDIR, FILE: stat.S_IFREG, SYMLINK: stat.S_IFLNK,
            HARDLINK: stat.S_IFREG, **_SPECIAL}[entry.kind]  # fmt: skip
    return stat.filemode(kind | entry.mode)


def remove_tree(path: str) -> None:
    """Remove a staging directory, even one holding directories restored read-only."""
    for current, dirs, _files in os.walk(path):
        for name in dirs:
            with contextlib.suppress(OSError):
                full = os.path.join(current, name)
                if not os.path.islink(full):
                    os.chmod(full, 0o700)
    shutil.rmtree(path, ignore_errors=True)
