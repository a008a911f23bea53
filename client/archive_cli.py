"""What kms-backup and kms-restore share: signals, the progress line, files that appear whole."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import BinaryIO, TextIO

from client.archive.tree import remove_tree
from client.cli_common import fsync_directory, remove_quietly

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: unwind, removing every temporary file, exit 130."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Turn termination signals into an exception, so `finally` blocks clean up."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_interrupted)


def silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the exit flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


class Progress:
    """A one-line progress display on a terminal (bytes, rate, ETA); nothing otherwise."""

    INTERVAL = 0.25

    def __init__(self, total: int | None, *, enabled: bool, out: TextIO | None = None) -> None:
        self._out = out or sys.stderr
        self.enabled = enabled and self._out.isatty()
        self.total = total
        self._done = 0
        self._started = time.monotonic()
        self._shown = 0.0
        self._drawn = False

    def advance(self, count: int) -> None:
        self._done += count
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._shown < self.INTERVAL:
            return
        self._shown = now
        elapsed = max(now - self._started, 1e-6)
        rate = self._done / elapsed
        line = f"{_human(self._done)}"
        if self.total:
            line += f" of {_human(self.total)} ({min(100, 100 * self._done // self.total)}%)"
        line += f"  {_human(rate)}/s"
        if self.total and rate > 0:
            left = max(self.total - self._done, 0) / rate
            line += f"  ETA {int(left) // 60}:{int(left) % 60:02d}"
        self._out.write("\r" + line.ljust(60))
        self._out.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._out.write("\r" + " " * 60 + "\r")
            self._out.flush()
            self._drawn = False


class ProgressReader:
    """Counts what is read from a stream (the archive during restore) for a `Progress`."""

    def __init__(self, stream: BinaryIO, progress: Progress) -> None:
        self._stream = stream
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._progress.advance(len(data))
        return data

    def readinto(self, buffer: memoryview) -> int:
        count = self._stream.readinto(buffer) or 0  # type: ignore[attr-defined]
        self._progress.advance(count)
        return count


def _open_anonymous(directory: Path) -> int | None:
    """An unnamed file in `directory` (O_TMPFILE): even SIGKILL leaves nothing behind."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, flag | os.O_WRONLY, 0o600)
    except OSError:
        return None  # filesystem without O_TMPFILE


class AtomicFile:
    """A new file that becomes visible at `target` only by `commit()`, whole, or never.

    Unnamed (O_TMPFILE) where the filesystem allows; otherwise a hidden temporary
    name beside the target, removed on any failure or signal.
    """

    def __init__(self, target: Path, suffix: str) -> None:
        self.target = target
        self._temp_name: Path | None = None
        fd = _open_anonymous(target.parent)
        if fd is None:
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=suffix)  # fmt: skip
            self._temp_name = Path(name)
        self.fd = fd
        self._suffix = suffix

    def commit(self, *, replace: bool) -> None:
        os.fsync(self.fd)
        if self._temp_name is None:
            # Link the unnamed file under a temporary name, then rename it over the target.
            name = self.target.parent / f".{self.target.name}.{os.getpid()}{self._suffix}"
            remove_quietly(name)
            # A directory fd makes os.link use linkat(AT_SYMLINK_FOLLOW), which /proc needs.
            parent = os.open(self.target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(f"/proc/self/fd/{self.fd}", name.name, dst_dir_fd=parent)
            finally:
                os.close(parent)
            self._temp_name = name
        if replace:
            os.replace(self._temp_name, self.target)
        else:
            # link() refuses to replace: no check-then-rename race with another writer.
            try:
                os.link(self._temp_name, self.target)
            finally:
                remove_quietly(self._temp_name)
        self._temp_name = None
        fsync_directory(self.target.parent)

    def discard(self) -> None:
        if self._temp_name is not None:
            remove_quietly(self._temp_name)
            self._temp_name = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@contextlib.contextmanager
def atomic_file(target: Path, suffix: str) -> Iterator[AtomicFile]:
    """An `AtomicFile` that is discarded unless committed inside the block."""
    handle = AtomicFile(target, suffix)
    try:
        yield handle
    finally:
        handle.discard()
        handle.close()


class FdWriter:
    """A minimal binary writer over a file descriptor (what ArchiveWriter writes to)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes | memoryview) -> int:
        return os.write(self._fd, data)


# A tree is restored into `.NAME.kms-restore-PID-RANDOM` beside its target. The restore holds
# an flock on that directory for as long as it lives; the kernel drops the lock when the
# process dies however it dies (SIGKILL, a crash), so a later restore can tell an abandoned
# staging directory (lock free) from one in progress (lock held), whatever the PID says now.
STAGING_MARK = ".kms-restore-"
_STAGING_NAME = re.compile(r"^\..*\.kms-restore-(\d+)-[a-z0-9_]+$", re.DOTALL)
_NAME_KEPT = 64  # bytes of the target's name in the staging name: room for the rest


def _lock(fd: int) -> bool | None:
    """Take the lock: True; another process holds it: False; no locks here: None."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _still_at(path: Path, fd: int) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class StagingDirectory:
    """A new hidden directory beside `target`, locked until `release()` or this process ends."""

    def __init__(self, target: Path) -> None:
        name = os.fsdecode(os.fsencode(target.name)[:_NAME_KEPT])
        prefix = f".{name}{STAGING_MARK}{os.getpid()}-"
        for _ in range(10):
            path = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            # A sweep by another restore may take it between mkdtemp and the lock: make another.
            if _lock(fd) is not False and _still_at(path, fd):
                self.path, self._fd = path, fd
                return
            os.close(fd)
        raise OSError(f"cannot hold a staging directory in {target.parent}")

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def remove_stale_staging(parent: Path, warn: Callable[[str], None]) -> None:
    """Remove the staging directories that restores killed outright left in `parent`.

    Only directories named like ours, owned by this user (any, for root) and not locked:
    their restore is gone. One that cannot be removed is named with how to remove it.
    """
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    euid = os.geteuid()
    for entry in entries:
        match = _STAGING_NAME.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if euid not in (0, os.fstat(fd).st_uid):
                continue  # another user's restore: not ours to judge
            if _lock(fd) is not True or not _still_at(Path(entry.path), fd):
                continue  # in progress (or this filesystem cannot tell): left alone
            remove_tree(entry.path)  # under our lock: no restore can adopt it meanwhile
            left = f"{entry.path}, left by an interrupted restore (process {match.group(1)})"
            if os.path.lexists(entry.path):
                warn(f"warning: cannot remove {left}: remove it by hand (rm -rf)")
            else:
                warn(f"removed {left}")
        finally:
            os.close(fd)
